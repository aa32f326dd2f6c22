"""Did a LoRA arrive intact? After ``pipe.load_lora_weights`` compare, layer by layer, the effective update the
pipeline's denoiser holds with the trained one.

Loading can go wrong silently: a lost alpha (every delta off by ``alpha / r``), attention projections dropped
for legacy key names (only a peft ``RuntimeWarning``), or nothing loaded at all for peft's own keys (only a
logger warning) -- see :mod:`stepdistill.lora.save`. :func:`verify_lora_loaded` catches each of these: it works
for UNets and SD3 / FLUX transformers, from a layer dict or from the file itself.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..models.family import denoiser_of
from .errors import LoraLoadError
from .files import read_lora_layers
from .layers import lora_delta
from .peft_adapter import intrinsic_scale, lora_modules


@dataclass
class LoraLoadReport:
    """Layer-by-layer comparison of a loaded adapter with the trained layers."""

    adapter_name: str
    expected: int
    loaded: int
    dropped: list[str] = field(default_factory=list)  # expected layers without the adapter in the UNet
    mismatched: list[tuple[str, float]] = field(default_factory=list)  # (path, relative error of delta W)
    unexpected: list[str] = field(default_factory=list)  # adapter layers nobody trained
    max_rel_err: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.dropped or self.mismatched or self.unexpected)

    def summary(self) -> str:
        s = (
            f"adapter {self.adapter_name!r}: {self.loaded}/{self.expected} layers loaded, "
            f"max relative delta error {self.max_rel_err:.2e}"
        )
        if self.dropped:
            more = " ..." if len(self.dropped) > 10 else ""
            s += f"; {len(self.dropped)} DROPPED: " + ", ".join(self.dropped[:10]) + more
        if self.mismatched:
            s += f"; {len(self.mismatched)} MISMATCHED: " + ", ".join(
                f"{p} (rel err {e:.2e})" for p, e in self.mismatched[:10]
            ) + (" ..." if len(self.mismatched) > 10 else "")
        if self.unexpected:
            s += f"; {len(self.unexpected)} UNEXPECTED: " + ", ".join(self.unexpected[:10])
        return s


def verify_lora_loaded(
    pipe,
    expected_layers: Mapping[str, tuple] | str | os.PathLike,
    adapter_name: str,
    *,
    rtol: float = 1e-2,
    atol: float = 1e-6,
    raise_on_error: bool = True,
) -> LoraLoadReport:
    """Compare the adapter ``pipe.unet`` (or ``pipe.transformer``; or ``pipe`` itself, a model) holds after
    ``load_lora_weights`` with the trained layers.

    Every expected layer must carry the adapter, with effective delta ``scale * B @ A`` (intrinsic scale
    ``lora_alpha / r``, so ``set_adapters`` weights do not matter) equal to ``alpha / r * up @ down`` within
    ``max|diff| <= rtol * max|expected| + atol`` (fp16 storage gives ~1e-3). ``expected_layers`` may be a layer
    dict or a LoRA file. Raises :class:`LoraLoadError` listing dropped / mismatched / unexpected layers.
    """
    unet = denoiser_of(pipe)
    if not isinstance(expected_layers, Mapping):
        expected_layers = read_lora_layers(expected_layers, unet)
    loaded = lora_modules(unet, adapter_name)
    report = LoraLoadReport(adapter_name=adapter_name, expected=len(expected_layers), loaded=0)
    for path, (down, up, alpha) in sorted(expected_layers.items()):
        module = loaded.get(path)
        if module is None:
            report.dropped.append(path)
            continue
        report.loaded += 1
        want = lora_delta(down, up, alpha)
        with torch.no_grad():
            A = module.lora_A[adapter_name].weight
            B = module.lora_B[adapter_name].weight
            got = intrinsic_scale(module, adapter_name) * (B.float().flatten(1) @ A.float().flatten(1)).cpu()
        if got.shape != want.shape:
            report.mismatched.append((path, float("inf")))
            report.max_rel_err = float("inf")
            continue
        scale = want.abs().max().item()
        err = (got - want).abs().max().item()
        rel = err / scale if scale > 0 else (0.0 if err <= atol else float("inf"))
        report.max_rel_err = max(report.max_rel_err, rel)
        if err > rtol * scale + atol:
            report.mismatched.append((path, rel))
    report.unexpected = sorted(set(loaded) - set(expected_layers))
    if raise_on_error and not report.ok:
        raise LoraLoadError("LoRA did not load intact: " + report.summary(), report)
    return report
