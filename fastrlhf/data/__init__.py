"""fastrlhf.data."""
