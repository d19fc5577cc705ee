"""The gateway: gRPC and HTTP entry, validation, split into parts, wait for fusion."""
