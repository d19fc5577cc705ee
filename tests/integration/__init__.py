"""Integration tests: real nats-server, tritonserver and service processes."""
