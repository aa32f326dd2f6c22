"""Training configuration: one dataclass, loaded from YAML recipes (``configs/*.yaml``) with strict keys and typed
values.

Every value -- from a recipe, a ``key=value`` override or code -- is checked against its field's type and coerced
where that is unambiguous (:func:`coerce_value`): ``1e-4`` is a float, ``500`` an int for an int field and a float
for a float field, ``[a, b]`` a list. YAML 1.1 would read ``no``/``off``/``yes``/``on`` as booleans (so
``mixed_precision=no`` became ``False``); recipes and overrides are read with YAML 1.2 scalars instead: only
``true``/``false`` are booleans, ``null``/``~`` is null, and ``1e-4`` is a number. A string field given on the
command line takes the text as written. A value of the wrong type is a :class:`ConfigError` naming the key and the
type it expects.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import methods
from ..errors import ConfigError
from ..models.family import LCM_LORA_TARGET_MODULES


@dataclass
class TrainConfig:
    # what to distill and how
    method: str = "lcd"                      # a key of stepdistill.methods.METHODS: "lcd", "reflow", "adversarial"
    pretrained_model: str = "toy"            # "toy", a local diffusers pipeline directory, or a hub id
    output_dir: str = "out/lcd"
    overwrite: bool = False                  # a fresh run may replace the run already in output_dir
    # data
    train_data: str = "toy:4000"             # see stepdistill.data.sources.load_examples
    caption_column: str = "text"
    image_column: str = "image"
    resolution: int | None = None            # default: the UNet's native size (sample_size x VAE factor)
    cache_dir: str | None = None             # default: <output_dir>/cache
    data_mode: str = "cached"                # "cached": encode train_data once into the latent cache (small and
                                             # mid-size sets); "streaming": read images while training and run the
                                             # VAE / text encoder each step (WebDataset shards at LAION scale)
    dataloader_num_workers: int = 0          # DataLoader worker processes per training process
    streaming_resample: bool = True          # streaming WebDataset: draw shards with replacement per stream
                                             # (ResampledShards); false: split the shards over processes x workers
    couplings_dir: str | None = None         # reflow: directory written by `stepdistill reflow couple`; several:
                                             # a YAML list, comma-separated, or glob patterns (couplings/part-*)
    # LoRA
    lora_rank: int = 64
    lora_alpha: float | None = None          # default: = rank (scale 1), as diffusers' LCM-LoRA example
    lora_dropout: float = 0.0                # peft's lora_dropout (kohya's network_dropout): dropout on each LoRA
                                             # branch's input while training; 0: off
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
    ema_decay: float = 0.0                   # > 0: keep an exponential moving average of the LoRA weights (decay
                                             # d, diffusers' EMAModel warm-up) and write it as the adapter; 0: off
    train_batch_size: int = 16               # per device
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000
    mixed_precision: str = "no"              # "no", "fp16" (CUDA only), "bf16" (LoRA parameters stay fp32)
    gradient_checkpointing: bool = False
    seed: int = 0
    process_group_timeout_minutes: int = 60  # multi-process runs: how long a collective waits (the cache build on
                                             # the main process, checkpoint gathers) before the run fails
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
    reflow_loss_type: str = "l2"             # "l2" (Rectified Flow eq. 1) or "pseudo_huber": sqrt(||v - v*||^2 + c^2) - c
                                             # per sample (Lee et al. 2024, after iCT)
    reflow_huber_c: float | None = None      # its c; default 0.00054 sqrt(latent dims) (iCT)
    perceptual_loss_weight: float = 0.0      # reflow, one window, UNet teachers: + this x LPIPS's distance (unit
                                             # weights) between the frozen teacher's features of the one-step sample
                                             # x_s - s v and of the coupling's data, both renoised to one t of
                                             # perceptual_timesteps (InstaFlow's LPIPS term, in latent space)
    perceptual_layers: list[str] = field(default_factory=lambda: ["down_blocks.0", "down_blocks.1", "mid_block"])
    perceptual_timesteps: list[int] = field(default_factory=lambda: [50, 200])
    # adversarial (method: adversarial; LADD-style GAN term, stepdistill/methods/adversarial.py, docs/methods.md)
    adv_distillation: str = "lcd"            # the distillation term: "lcd" (consistency target) or "reflow"
                                             # (velocity target on couplings_dir; reflow_windows must be 1)
    gan_loss_weight: float = 0.1             # L_G = L_distill + gan_loss_weight * L_gan; 0: distillation only
    distill_loss_weight: float = 1.0         # weight of L_distill; 0: the GAN / DMD terms alone (LADD, DMD2 without
                                             # its regression loss), the distillation term is then not computed
    gan_loss: str = "hinge"                  # "hinge" (ADD / LADD) or "nonsaturating" (Goodfellow et al. 2014)
    disc_learning_rate: float = 1e-4         # AdamW of the discriminator heads (betas 0, 0.99)
    disc_r1_weight: float = 0.0              # gamma of the R1 penalty (gamma / 2) E||grad D||^2 on real features
    disc_layers: list[str] = field(default_factory=lambda: ["down_blocks.1", "mid_block"])  # teacher blocks tapped
    disc_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700])  # t_hat: one drawn per sample
    disc_head_channels: int = 64             # width of each discriminator head
    dmd_loss_weight: float = 0.0             # + dmd_loss_weight * L_dmd (DMD/DMD2 distribution matching); 0: off
    dmd_real_guidance: float = 1.75          # CFG scale of the real score (the teacher), as DMD2's SD recipe
    dmd_fake_rank: int = 16                  # rank of the fake score's LoRA (a second adapter on the same UNet)
    dmd_fake_learning_rate: float = 1e-4     # its AdamW learning rate
    dmd_fake_updates: int = 1                # fake-score updates per generator step (DMD2's two time-scale rule: 5)
    dmd_timestep_range: list[int] = field(default_factory=lambda: [20, 980])  # t of the DM gradient, uniform
    # knowledge-distillation levers, every method (stepdistill/methods/levers.py, docs/methods.md):
    #   L = L_method + data_loss_weight * E||f_student(x_t, t, c) - y||^2 + feature_loss_weight * L_feat
    data_loss_weight: float = 0.0            # alpha-mix with the plain denoising loss on cached real data (y: the
                                             # model's native eps / v / x0 target; Hinton et al. 2015's hard label)
    feature_loss_weight: float = 0.0         # FitNets term: sum over feature_layers of ||h_student - h_teacher||^2 /
                                             # mean h_teacher^2 at the same noised data input (teacher: adapter off)
    feature_layers: list[str] = field(default_factory=lambda: ["mid_block"])
    teachers: list[str] = field(default_factory=list)  # ["MODEL@WEIGHT", ...]: LCD's teacher prediction is their
                                             # weighted guided prediction sum w_i pred_i / sum w_i; pretrained_model
                                             # names the student's own base; empty: the base alone
    # bookkeeping
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = 3
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "latest"
    validation_steps: int = 500
    validation_prompts: list[str] = field(default_factory=list)
    validation_step_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    validation_couplings_dir: str | None = None  # reflow / adversarial on couplings: couplings the run never trains
                                             # on; every validation_steps (and at the end) the regression loss on
                                             # them is logged as heldout_loss, beside the training loss
    validation_batches: int = 8              # batches of train_batch_size held-out couplings per measurement
    report_to: str = "tensorboard"
    save_diffusers_format: bool = False      # also write the diffusers-native layout under <output_dir>/diffusers/

    def __post_init__(self):
        if isinstance(self.couplings_dir, (list, tuple)):  # a list of coupling directories: one string
            self.couplings_dir = ",".join(os.fspath(d) for d in self.couplings_dir)
        hints = field_types()
        for f in dataclasses.fields(self):
            setattr(self, f.name, coerce_value(f.name, getattr(self, f.name), hints[f.name]))
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        for key in ("lora_rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps",
                    "process_group_timeout_minutes", "validation_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.data_mode not in ("cached", "streaming"):
            raise ConfigError(f"data_mode must be 'cached' or 'streaming', got {self.data_mode!r}")
        for key in ("checkpointing_steps", "validation_steps", "lr_warmup_steps", "dataloader_num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0 (0 turns it off), got {getattr(self, key)}")
        if not (self.learning_rate >= 0 and math.isfinite(self.learning_rate)):
            raise ConfigError(f"learning_rate must be a finite number >= 0, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1) (0 turns it off; e.g. 0.1), got {self.lora_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay must be in [0, 1) (0 turns it off; e.g. 0.999), got {self.ema_decay}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ConfigError("checkpoints_total_limit must be >= 1, or null to keep every checkpoint")
        methods.check_config(self)  # the method's registry entry checks its own keys

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / "cache"


# ----------------------------------------------------------------------------------------------------------------
# typed values


class _Yaml12Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 core-schema booleans (``true``/``false`` only; ``no``, ``off``, ``yes`` and
    ``on`` stay strings) and floats (``1e-4``, ``1E5``, ``.5`` are numbers, not strings)."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _bool_from_yaml12(loader, node):
    return loader.construct_scalar(node).lower() == "true"


def _float_from_yaml12(loader, node):
    text = loader.construct_scalar(node).lower()
    if text.endswith("inf"):
        return -math.inf if text.startswith("-") else math.inf
    return math.nan if text.endswith("nan") else float(text)


_Yaml12Loader.add_constructor("tag:yaml.org,2002:bool", _bool_from_yaml12)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _float_from_yaml12)
_NULLS = ("", "~", "null", "Null", "NULL")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def load_yaml(text: str):
    """YAML with 1.2 scalars (see :class:`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader subclass


def field_types() -> dict[str, object]:
    """``{key: type}`` of :class:`TrainConfig` (``int | None``, ``list[str]`` ...)."""
    return typing.get_type_hints(TrainConfig)


def _split_optional(tp) -> tuple[object, bool]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def type_name(tp) -> str:
    base, optional = _split_optional(tp)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        name = f"a list of {_NAMES[item]}s"
    else:
        name = ("an " if _NAMES[base][0] in "aeiou" else "a ") + _NAMES[base]
    return name + (" or null" if optional else "")


_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean"}
_EXAMPLES = {str: "text", int: "3", float: "1e-4", bool: "true"}


def _shown(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


def coerce_value(key: str, value, tp, from_text: bool = False):
    """``value`` for config key ``key`` as type ``tp``; ``from_text``: ``value`` is the text of a ``key=value``
    override (a string field takes it as written, other fields parse it as YAML 1.2)."""
    base, optional = _split_optional(tp)
    if from_text:
        if optional and value.strip() in _NULLS:
            return None
        if base is str:
            return value
        value = load_yaml(value) if value.strip() else None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key} expects {type_name(tp)}, got null; give it a value or leave the key out")
    try:
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            if isinstance(value, str) and item is not str:  # `validation_step_counts=1,2,4`
                value = [load_yaml(v) for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return [_scalar(v, item) for v in value]
        return _scalar(value, base)
    except (TypeError, ValueError):
        example = _EXAMPLES.get(base) or ("[1, 2, 4]" if typing.get_args(base)[0] is int else "[a, b]")
        raise ConfigError(f"config key {key} expects {type_name(tp)}, got {_shown(value)}; e.g. {key}={example}"
                          ) from None


def _scalar(value, tp):
    if tp is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if not isinstance(value, str):
            raise TypeError
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError
    if isinstance(value, bool):  # bool is an int in Python; never a number here
        raise TypeError
    if isinstance(value, str):
        value = load_yaml(value)
        if isinstance(value, (str, bool)) or value is None:
            raise TypeError
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if not isinstance(value, int):
            raise TypeError
        return value
    if tp is float:
        if not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    raise TypeError


# ----------------------------------------------------------------------------------------------------------------
# loading


def _check_keys(data: dict, source: str):
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [k for k in data if k not in valid]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(k, valid, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown config key(s) in {source}: {', '.join(hints)}; valid keys: {', '.join(sorted(valid))}")


class OverrideText(str):
    """The text of a ``key=value`` override (:func:`parse_override`), coerced by its field's type in
    :func:`load_config`."""


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Load a YAML recipe, then apply ``overrides`` (e.g. from the command line); unknown keys are errors, values
    are checked against the field types (``key=value`` texts from :func:`parse_override` are parsed by type)."""
    data = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"recipe {path} not found; pass an existing YAML file (see configs/)") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"recipe {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
                              ) from None
        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or e}); fix the recipe"
                              ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys (key: value lines)")
        _check_keys(data, str(path))
        hints = field_types()
        if isinstance(data.get("couplings_dir"), list):  # a YAML list of coupling directories: one string
            data["couplings_dir"] = ",".join(str(d) for d in data["couplings_dir"])
        for key, value in data.items():
            try:
                data[key] = coerce_value(key, value, hints[key])
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_keys(overrides, "overrides")
    hints = field_types()
    for key, value in overrides.items():
        data[key] = coerce_value(key, str(value), hints[key], from_text=True) if isinstance(value, OverrideText) else value
    return TrainConfig(**data)


def parse_override(text: str) -> tuple[str, OverrideText]:
    """``key=value`` -> ``(key, value text)``; :func:`load_config` parses the text by the key's type (``no`` stays
    the string for ``mixed_precision``, ``1e-3`` is a float, ``[a, b]`` a list)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, value = text.split("=", 1)
    return key.strip(), OverrideText(value)
