"""The in-memory form of a LoRA, whatever file it came from: a layer dict ``{diffusers module path: (down, up,
alpha)}`` with effective update ``delta W = alpha / r * up @ down`` (``r = down.shape[0]``). Linear layers: down
``(r, in)``, up ``(out, r)``; conv layers: down ``(r, in, kh, kw)``, up ``(out, r, 1, 1)``.

Here: the update itself, the shape checks of one layer, grouping ``<path>.<down>`` / ``<path>.<up>`` pairs
into layers, and checking layers against the modules of a base model."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from .errors import LoraFormatError

# {diffusers module path: (down, up, alpha)}; delta W = alpha / r * up @ down, r = down.shape[0]
LoraLayers = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def lora_delta(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    """Effective weight update ``alpha / r * up @ down``, flattened to (out, in * kh * kw), float32."""
    r = down.shape[0]
    return (alpha / r) * (up.float().flatten(1) @ down.float().flatten(1))


def check_pair(name: str, down: torch.Tensor, up: torch.Tensor):
    """Raise :class:`LoraFormatError` unless ``down`` / ``up`` are the two factors of one plain LoRA layer."""
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraFormatError(f"{name}: bad LoRA shapes down {tuple(down.shape)}, up {tuple(up.shape)}")
    if up.shape[1] != down.shape[0]:
        raise LoraFormatError(
            f"{name}: mismatched ranks: down {tuple(down.shape)} has rank {down.shape[0]}, "
            f"up {tuple(up.shape)} has rank {up.shape[1]}"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraFormatError(f"{name}: conv lora_up must be (out, r, 1, 1), got {tuple(up.shape)}")


def pairs_to_layers(state_dict: Mapping[str, torch.Tensor], a: str, b: str, what: str) -> LoraLayers:
    """Group ``<path>.<a>`` / ``<path>.<b>`` pairs into a layer dict with alpha = r (scale 1)."""
    layers = {}
    downs = {k[: -len(a)]: v for k, v in state_dict.items() if k.endswith(a)}
    ups = {k[: -len(b)]: v for k, v in state_dict.items() if k.endswith(b)}
    lonely = sorted(set(downs) ^ set(ups))
    if lonely:
        raise LoraFormatError(f"{what}: LoRA layers with only one of {a}/{b}: " + ", ".join(lonely[:8]))
    for path in downs:
        check_pair(path, downs[path], ups[path])
        layers[path] = (downs[path], ups[path], float(downs[path].shape[0]))
    return layers


def lora_targetable_modules(model) -> dict[str, torch.nn.Module]:
    """{path: module} of the Linear/Conv layers of ``model`` a LoRA can target (peft wrappers resolved)."""
    found: dict[str, torch.nn.Module] = {}
    tuner_prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in tuner_prefixes):
            continue  # base_layer / lora_A / lora_B inside a peft layer
        if isinstance(module, BaseTunerLayer):
            tuner_prefixes.append(name + ".")
            found[name] = module.get_base_layer()
        elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
            found[name] = module
    return found


def shape_problem(path: str, module: torch.nn.Module, down: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why the LoRA factors cannot apply to ``module``'s weight, or None if they fit."""
    w = module.weight
    if down.ndim != w.ndim or up.ndim != w.ndim:
        return f"{path}: LoRA is {down.ndim}-d, module weight {tuple(w.shape)}"
    if down.shape[1] != w.shape[1] or up.shape[0] != w.shape[0] or tuple(down.shape[2:]) != tuple(w.shape[2:]):
        return (
            f"{path}: LoRA down {tuple(down.shape)} / up {tuple(up.shape)} does not fit the module weight "
            f"{tuple(w.shape)}"
        )
    return None


def layers_not_fitting(layers: Mapping[str, tuple], model) -> list[str]:
    """The layers (paths, or shape problems) of ``layers`` that name no module of ``model`` or do not fit it."""
    modules = lora_targetable_modules(model)
    bad = [p for p in layers if p not in modules]
    bad += [s for p, (d, u, _) in layers.items() if p in modules and (s := shape_problem(p, modules[p], d, u))]
    return bad


def underscored_names(paths: Iterable[str]) -> dict[str, list[str]]:
    """``{path with "." -> "_": [paths]}``: inverts kohya-style names (``lora_unet_<path>``,
    ``lora_transformer_<path>``) against a model's module paths; ambiguous where a list holds several."""
    by_name: dict[str, list[str]] = {}
    for path in paths:
        by_name.setdefault(path.replace(".", "_"), []).append(path)
    return by_name
