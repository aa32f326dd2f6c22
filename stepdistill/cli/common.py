"""Small parsers shared by the commands."""
from __future__ import annotations


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``path[:weight]`` -> (path, weight)."""
    path, sep, weight = spec.rpartition(":")
    if sep and weight.replace(".", "", 1).replace("-", "", 1).isdigit():
        return path, float(weight)
    return spec, 1.0
