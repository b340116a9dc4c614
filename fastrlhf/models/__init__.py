"""fastrlhf.models."""
