"""fastrlhf.engine."""
