"""Averaging adapters: the weighted mean of several LoRAs' weight updates, refactored into one LoRA.

A "model soup" (Wortsman et al. 2022, eq. 1: the uniform soup ``theta = mean_i theta_i``) of fine-tunes that share
their start -- here, runs continued from the same adapter with different losses, data or seeds -- is often better
than each of them (docs/results.md measures it on the one-step regression). For LoRAs the average is taken of the
effective updates ``delta W_i = alpha_i / r_i * up_i @ down_i`` (averaging the factors would not average the
products), and each layer's mean update is refactored by SVD into rank ``r`` (the inputs' largest rank unless
given): ``up = U_r sqrt(S_r)``, ``down = sqrt(S_r) V_r^T``, ``alpha = r`` (scale 1). That is exact when the mean
update's rank is at most ``r`` -- always when ``r`` reaches the layer's smaller dimension -- and otherwise the best
rank-``r`` approximation (Eckart-Young), as kohya's ``svd_merge_lora.py`` does; the relative error of each layer is
reported. Only layers present in every input are averaged: differing layer sets are refused.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import LoraFormatError
from .export import Adapter, read_adapter, write_adapter
from .layers import LoraLayers, lora_delta


def refactor(delta: torch.Tensor, rank: int, down_shape: tuple, up_shape: tuple
             ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down, up, relative error)``: the best rank-``rank`` factors of ``delta`` (``(out, in * kh * kw)``),
    shaped like a LoRA layer's (conv: ``(r, in, kh, kw)`` / ``(out, r, 1, 1)``), alpha = rank."""
    d = delta.double()
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    k = min(rank, S.numel())
    root = S[:k].sqrt()
    down = torch.zeros(rank, d.shape[1], dtype=torch.float64)
    up = torch.zeros(d.shape[0], rank, dtype=torch.float64)
    down[:k], up[:, :k] = root[:, None] * Vh[:k], U[:, :k] * root
    total = float(S.pow(2).sum())
    error = (float(S[k:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    return (down.reshape(rank, *down_shape[1:]).float(), up.reshape(up_shape[0], rank, *up_shape[2:]).float(),
            error)


def average_layers(adapters: Sequence[LoraLayers], weights: Sequence[float] | None = None,
                   rank: int | None = None) -> tuple[LoraLayers, dict[str, float]]:
    """The weighted mean ``sum_i w_i delta W_i / sum_i w_i`` of every layer, refactored at ``rank`` (default: the
    inputs' largest). Returns ``(layers, {path: relative truncation error})``."""
    if not adapters:
        raise ValueError("average_layers needs at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise ValueError(f"{len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    if any(not w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    paths = set(adapters[0])
    for i, layers in enumerate(adapters[1:], 1):
        if set(layers) != paths:
            diff = sorted(paths ^ set(layers))
            raise LoraFormatError(f"adapter {i + 1} has other layers than adapter 1 ({len(diff)} differ, e.g. "
                                  f"{', '.join(diff[:3])}): average adapters of the same targets")
    rank = rank or max(layers[p][0].shape[0] for layers in adapters for p in layers)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    total = sum(weights)
    out, errors = {}, {}
    for p in sorted(paths):
        shapes = {tuple(layers[p][1].shape[:1]) + tuple(layers[p][0].shape[1:]) for layers in adapters}
        if len(shapes) != 1:
            raise LoraFormatError(f"{p}: the adapters update weights of different shapes {sorted(shapes)}: they "
                                  "were trained for different base models")
        delta = sum(w / total * lora_delta(*adapters[i][p]).double() for i, w in enumerate(weights) if w)
        down, up, errors[p] = refactor(delta, rank, tuple(adapters[0][p][0].shape), tuple(adapters[0][p][1].shape))
        out[p] = (down, up, float(rank))
    return out, errors


def average_adapters(inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                     weights: Sequence[float] | None = None, rank: int | None = None, format: str = "kohya",
                     base=None, dtype: torch.dtype | None = None) -> tuple[Path, dict[str, float]]:
    """Read the LoRA files (or run directories) ``inputs``, write their weighted average to ``out`` in ``format``
    (kohya by default) with the first input's header (its sampler, steps and guidance) plus
    ``stepdistill.averaged_from`` / ``stepdistill.average_weights``. Returns ``(path, {layer: relative error})``."""
    read = [read_adapter(p, base) for p in inputs]
    if len({a.component for a in read}) != 1:
        raise LoraFormatError("the adapters are for different components (UNet and transformer): average one kind")
    first = read[0]
    methods = {a.metadata.get("stepdistill.method") for a in read} - {None}
    if len(methods) > 1:
        raise LoraFormatError(f"the adapters come from different methods ({', '.join(sorted(methods))}), whose "
                              "samplers differ: average adapters of one method")
    layers, errors = average_layers([a.layers for a in read], weights, rank)
    names = [str(a.path) for a in read]
    extra = {"stepdistill.averaged_from": ",".join(names),
             "stepdistill.average_weights": ",".join(f"{w:g}" for w in (weights or [1.0] * len(read)))}
    dtype = dtype or next(iter(first.layers.values()))[0].dtype
    path = write_adapter(Adapter(layers=layers, metadata=first.metadata, format=first.format,
                                 component=first.component), out, format, metadata=extra, dtype=dtype)
    return path, errors
