"""The model registry: versions, traffic policy and rollouts of every model, in JetStream KV."""
