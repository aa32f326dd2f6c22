"""Experiments on the embedded toy world: the demo (teacher vs. distilled students), the style LoRA and the
stacking / transfer studies. They sit on top of the library (training, eval) and below the CLI."""
