"""Training: loop, loss, checkpoints, distributed setup."""
