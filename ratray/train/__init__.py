"""Training: the one place where models and retrieval meet (Ray Train + DeepSpeed)."""
