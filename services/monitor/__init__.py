"""Monitor: consumes every service's telemetry; per-stage counts and latency."""
