"""Run under ``torchrun`` by tests/test_distributed.py: one training run (``train`` ends by destroying the process
group, so one run per launch). Every process records the LoRA parameters it holds at each finite-weights check
(every checkpoint and the end) in ``<output_dir>/params-rank<r>.safetensors``, so the test can compare ranks.

    torchrun --standalone --nproc_per_node 2 tests/distributed_worker.py SPEC.json
    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 tests/distributed_worker.py SPEC.json
    SPEC.json: {"config": {...TrainConfig keys...}, "interrupt_after": null or a step,
                "engine_on_cpu": null, "fsdp" or "deepspeed" (see take_engine_on_cpu)}
"""
import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from stepdistill.training import loop
from stepdistill.training.config import load_config

_check = loop.check_finite_weights


def gathered(params) -> tuple[list, bool]:
    """Whole copies of ``params`` and whether they were sharded: FSDP2 holds DTensors, DeepSpeed ZeRO-3 empty
    placeholders (``ds_id``) of partitioned tensors; both gathers are collectives, made on every process."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().cpu().clone() for p in params], True
    if all(isinstance(p, DTensor) for p in params):
        return [p.full_tensor().detach().float().cpu() for p in params], True
    return [p.detach().float().cpu() for p in params], False


def _recording_check(params, step, config):
    _check(params, step, config)
    rank = int(os.environ.get("RANK", "0"))
    whole, sharded = gathered(params)
    (Path(config.output_dir) / f"sharded-rank{rank}.json").write_text(json.dumps({"sharded": sharded}))
    tensors = {f"p{i:04d}": p.contiguous() for i, p in enumerate(whole)}
    save_file(tensors, str(Path(config.output_dir) / f"params-rank{rank}.safetensors"))


def take_engine_on_cpu(engine: str):
    """Start accelerate's process state so that ``engine`` runs on CPU processes (gloo).

    accelerate 1.15 keeps a CPU run out of both sharding engines (``accelerate/state.py``): it takes the FSDP plugin
    only from a GPU-like multi-process type, and honours ``ACCELERATE_USE_DEEPSPEED`` only when not on the CPU.
    Torch's FSDP2 shards on CPU, and DeepSpeed has a CPU accelerator (``DS_ACCELERATOR=cpu``) that communicates over
    gloo. So, for ``fsdp``, the test relabels the CPU state as multi-GPU; for ``deepspeed`` it starts the state as a
    non-CPU run on the gloo backend and keeps the loop from asking for the CPU. From there on the sharding, the
    sharded checkpoints and the gathers are torch's, DeepSpeed's and accelerate's own."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if engine == "fsdp":
        state = PartialState(cpu=True)
        if state.distributed_type != DistributedType.MULTI_CPU:
            raise RuntimeError(f"expected a gloo CPU run, got {state.distributed_type}")
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
    elif engine == "deepspeed":
        import deepspeed.ops

        # DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce at start-up (~30 s on a new
        # machine). Only its inference all-reduce (tensor-parallel inference) uses it, never training, so the test
        # leaves it out and every collective of the run goes through gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        os.environ.pop("ACCELERATE_USE_CPU", None)
        loop.use_cpu = lambda: False
        state = PartialState(cpu=False, backend="gloo")
        if state.distributed_type != DistributedType.DEEPSPEED or state.num_processes < 2:
            raise RuntimeError(f"expected DeepSpeed on gloo, got {state.distributed_type} x {state.num_processes}")
    else:
        raise ValueError(engine)


def main(spec_path: str):
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("engine_on_cpu"):
        take_engine_on_cpu(spec["engine_on_cpu"])
    loop.check_finite_weights = _recording_check  # the loop calls it on every process before it writes weights
    try:
        loop.train(load_config(None, **spec["config"]), interrupt_after=spec.get("interrupt_after"))
    except loop.TrainingInterrupted:
        pass


if __name__ == "__main__":
    main(sys.argv[1])
