"""The safetensors header of a LoRA file: kohya's ``ss_*`` keys, the SAI ``modelspec.*`` keys and stepdistill's
own ``stepdistill.*`` model card (method, recommended sampler / steps / guidance...). All values are strings, as
the format requires.

On export the card is carried over and the keys that describe the tensors or the layout are regenerated; older
stepdistill files wrote the card without the ``stepdistill.`` prefix, and are read (and promoted) as such.
"""
from __future__ import annotations

import collections
import datetime
import json
from collections.abc import Mapping
from typing import Any

from .. import __version__
from .base_model_tags import BASE_MODEL_VERSIONS, FLOW_FAMILIES
from .diffusers_layout import FOLDED_ALPHA_KEY
from .kohya import KOHYA_NETWORK_MODULE

# Metadata keys that describe the tensors themselves; a caller may not override them.
_STRUCTURAL_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha")
# Header keys that describe the tensors or the file layout: regenerated on export, never copied.
_REGENERATED_KEYS = {
    "format", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.resolution",
    "modelspec.date", "stepdistill.version", "stepdistill.per_layer_rank_alpha", FOLDED_ALPHA_KEY,
    "stepdistill.export_source_format",
}
# Older stepdistill files wrote the model card without the "stepdistill." prefix.
_LEGACY_CARD_KEYS = ("method", "method_name", "scheduler", "recommended_steps", "recommended_guidance",
                     "alternative_scheduler", "num_windows", "base_model", "prediction_type", "train_steps")


def metadata_str(value) -> str:
    """A header value as a string: strings as they are, numbers / bools / None by ``str``, the rest as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)) or value is None:
        return str(value)
    return json.dumps(value, sort_keys=True)


def _header(ranks: collections.Counter, alphas: collections.Counter, architecture: str, implementation: str,
            title: str) -> dict[str, str]:
    """The keys every stepdistill LoRA header has (rank / alpha: the most common values)."""
    return {
        "format": "pt",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": str(alphas.most_common(1)[0][0]),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "stepdistill.version": __version__,
    }


def build_metadata(
    lora_layers: Mapping[str, tuple],
    *,
    base_model_version: str = "sd_v1",
    title: str = "stepdistill LoRA",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """kohya ``ss_*`` + SAI ``modelspec.*`` header for ``lora_layers`` (all values strings)."""
    if base_model_version not in BASE_MODEL_VERSIONS:
        raise ValueError(f"unknown base_model_version {base_model_version!r}; one of {sorted(BASE_MODEL_VERSIONS)}")
    arch, impl, resolution = BASE_MODEL_VERSIONS[base_model_version]
    ranks = collections.Counter(int(d.shape[0]) for d, _, _ in lora_layers.values())
    alphas = collections.Counter(float(a) for _, _, a in lora_layers.values())
    md = _header(ranks, alphas, arch, impl, title)
    md.update({"ss_base_model_version": base_model_version, "ss_network_module": KOHYA_NETWORK_MODULE,
               "modelspec.resolution": resolution})
    if len(ranks) > 1 or len(alphas) > 1:
        md["stepdistill.per_layer_rank_alpha"] = "True"  # ss_network_dim/alpha are the most common values
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        value = metadata_str(value)
        if key in _STRUCTURAL_KEYS and value != md[key]:
            raise ValueError(f"metadata[{key!r}]={value!r} contradicts the LoRA tensors ({md[key]!r})")
        md[key] = value
    return md


def flow_metadata(layers: Mapping[str, tuple], family: str, title: str, extra: Mapping[str, str],
                  folded: bool) -> dict[str, str]:
    """Header of a transformer (SD3 / FLUX) LoRA; ``folded``: alpha is folded into the weights (alpha = r)."""
    ranks = collections.Counter(int(d.shape[0]) for d, _, _ in layers.values())
    alphas = collections.Counter(float(d.shape[0] if folded else a) for d, _, a in layers.values())
    md = _header(ranks, alphas, FLOW_FAMILIES.get(family, ("unknown",))[0], "diffusers", title)
    if family in FLOW_FAMILIES:
        md["ss_base_model_version"] = family
    md.update(extra)
    return md


def passthrough_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The header entries an exported file keeps: all but the regenerated ones, old bare card keys promoted to
    ``stepdistill.<key>``."""
    out = {k: v for k, v in metadata.items() if k not in _REGENERATED_KEYS}
    for k in _LEGACY_CARD_KEYS:  # old stepdistill files: promote the bare card keys
        if k in out and f"stepdistill.{k}" not in out:
            out[f"stepdistill.{k}"] = out[k]
    return out


def stepdistill_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The stepdistill model card of a header, ``stepdistill.`` prefix removed (old bare keys included)."""
    out = {k[len("stepdistill."):]: v for k, v in metadata.items() if k.startswith("stepdistill.")}
    for k in _LEGACY_CARD_KEYS:
        if k in metadata and k not in out:
            out[k] = metadata[k]
    return out
