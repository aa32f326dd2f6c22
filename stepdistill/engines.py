"""What an accelerate engine does with the trained weights: the one place that reads the engine's type and stage.

DDP and DeepSpeed ZeRO-1/2 keep every weight whole on every process; FSDP and DeepSpeed ZeRO-3 shard the weights
over the processes (docs/scaling.md, "Which engines ran where")."""
from __future__ import annotations

from accelerate.utils import DistributedType


def deepspeed_zero_stage(accelerator) -> int:
    """The ZeRO stage of a run under DeepSpeed; 0 under any other engine."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) or 0)


def shards_weights(accelerator) -> bool:
    """Whether the engine shards the trained weights over the processes (FSDP, DeepSpeed ZeRO-3)."""
    return accelerator.distributed_type == DistributedType.FSDP or deepspeed_zero_stage(accelerator) == 3
