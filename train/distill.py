"""Distill a teacher into a few-step LoRA (LCD or reflow), from a YAML recipe plus key=value overrides.

    python train/distill.py --config configs/toy-lcm-lora.yaml
    accelerate launch --multi_gpu --num_processes 8 train/distill.py --config configs/sd15-lcm-lora.yaml \
        train_data=/data/laion-aesthetic mixed_precision=bf16

Same as `stepdistill distill`. Multi-GPU: `train_batch_size` is per device; accelerate gives each process its
share of one seeded batch stream and averages the gradients (configs/accelerate/, docs/scaling.md).
"""
import sys

from stepdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["distill", *sys.argv[1:]]))
