"""Training: config, data, model, loop, checkpoints, CLI."""
