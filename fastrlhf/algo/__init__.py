"""fastrlhf.algo."""
