"""Run under ``torchrun`` by tests/test_distributed.py: one training run (``train`` ends by destroying the process
group, so one run per launch). Every process records the LoRA parameters it holds at each finite-weights check
(every checkpoint and the end) in ``<output_dir>/params-rank<r>.safetensors``, so the test can compare ranks.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py SPEC.json
    SPEC.json: {"config": {...TrainConfig keys...}, "interrupt_after": null or a step}
"""
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from stepdistill.training import loop
from stepdistill.training.config import load_config

_check = loop.check_finite_weights


def _recording_check(params, step, config):
    _check(params, step, config)
    rank = int(os.environ.get("RANK", "0"))
    tensors = {f"p{i:04d}": p.detach().float().cpu().contiguous() for i, p in enumerate(params)}
    save_file(tensors, str(Path(config.output_dir) / f"params-rank{rank}.safetensors"))


def main(spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    loop.check_finite_weights = _recording_check  # the loop calls it on every process before it writes weights
    try:
        loop.train(load_config(None, **spec["config"]), interrupt_after=spec.get("interrupt_after"))
    except loop.TrainingInterrupted:
        pass


if __name__ == "__main__":
    main(sys.argv[1])
