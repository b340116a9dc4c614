"""fastrlhf.trainers."""
