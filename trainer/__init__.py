"""The training loop, its configs, the data stream, checkpoints and metrics."""
