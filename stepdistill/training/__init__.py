"""The training loop (accelerate), its strict YAML config, checkpoints and the model card."""
