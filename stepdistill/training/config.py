"""Training configuration: one dataclass, loaded from YAML recipes (``configs/*.yaml``) with strict keys."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import methods
from ..errors import ConfigError
from ..models.family import LCM_LORA_TARGET_MODULES


@dataclass
class TrainConfig:
    # what to distill and how
    method: str = "lcd"                      # a key of stepdistill.methods.METHODS: "lcd" or "reflow"
    pretrained_model: str = "toy"            # "toy", a local diffusers pipeline directory, or a hub id
    output_dir: str = "out/lcd"
    # data
    train_data: str = "toy:4000"             # see stepdistill.data.sources.load_examples
    caption_column: str = "text"
    image_column: str = "image"
    resolution: int | None = None            # default: the UNet's native size (sample_size x VAE factor)
    cache_dir: str | None = None             # default: <output_dir>/cache
    couplings_dir: str | None = None         # reflow: directory written by `stepdistill reflow couple`
    # LoRA
    lora_rank: int = 64
    lora_alpha: float | None = None          # default: = rank (scale 1), as diffusers' LCM-LoRA example
    lora_target_modules: list[str] = field(default_factory=lambda: list(LCM_LORA_TARGET_MODULES))
    # optimisation
    learning_rate: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    train_batch_size: int = 16               # per device
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    mixed_precision: str = "no"              # "no", "fp16", "bf16" (LoRA parameters stay fp32)
    gradient_checkpointing: bool = False
    seed: int = 0
    # LCD (LCM / LCM-LoRA)
    num_ddim_timesteps: int = 50
    w_min: float = 5.0                       # LCM guidance w ~ U[w_min, w_max]; CFG scale = 1 + w
    w_max: float = 15.0
    loss_type: str = "huber"                 # "l2" or "huber" (pseudo-Huber)
    huber_c: float = 0.001
    timestep_scaling_factor: float = 10.0
    # reflow
    reflow_windows: int = 1                  # 1: InstaFlow-style single window; >1: PeRFlow piecewise
    reflow_time_distribution: str = "uniform"  # "uniform", "logit_normal", or "noise" (s = sigma_max only:
                                               # InstaFlow's one-step distillation stage)
    init_lora: str | None = None             # start the trained adapter from this LoRA file (same layers/rank)
    reflow_loss_weighting: str = "velocity"    # "velocity": MSE on the flow velocity (Rectified Flow eq. 1);
                                               # "native": MSE in the model's output space (eps/v/x0)
    # bookkeeping
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest"
    validation_steps: int = 500
    validation_prompts: list[str] = field(default_factory=list)
    validation_step_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    report_to: str = "tensorboard"
    save_diffusers_format: bool = False      # also write the diffusers-native layout under <output_dir>/diffusers/

    def __post_init__(self):
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.lora_rank < 1:
            raise ConfigError("lora_rank must be >= 1")
        methods.check_config(self)  # the method's registry entry checks its own keys

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"


def _check_keys(data: dict, source: str):
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [k for k in data if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config key(s) in {source}: {', '.join(hints)}; valid keys: {', '.join(sorted(valid))}")


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Load a YAML recipe, then apply ``overrides`` (e.g. from the command line); unknown keys are errors."""
    data = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        _check_keys(data, str(path))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_keys(overrides, "overrides")
    data.update(overrides)
    return TrainConfig(**data)


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with the value parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)
