"""A rank's training: its stage, optimizer and loop, its configs, checkpoints and resumes."""
