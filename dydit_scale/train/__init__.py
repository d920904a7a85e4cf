"""Training: the loop, DeepSpeed config and engine, checkpoints, metrics."""
