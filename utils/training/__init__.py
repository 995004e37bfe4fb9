"""Training: the shared loop, checkpoints, schedule, DDP helpers, samplers, losses and heads."""
