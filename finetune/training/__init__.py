"""Training: the stages of a run, the Trainer set-up, measurement (tokens/s, memory), W&B tracking,
multi-process launches and sweep-job processes."""
