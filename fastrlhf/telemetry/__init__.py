"""fastrlhf.telemetry."""
