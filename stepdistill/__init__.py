"""stepdistill: step distillation of diffusion models into few-step LoRA adapters."""
__version__ = "0.1.0"
