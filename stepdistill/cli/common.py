"""Small parsers and argument checks shared by the commands."""
from __future__ import annotations

from ..errors import ConfigError


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``path[:weight]`` -> (path, weight)."""
    path, sep, weight = spec.rpartition(":")
    if sep and weight.replace(".", "", 1).replace("-", "", 1).isdigit():
        return path, float(weight)
    return spec, 1.0


def check_at_least(**checks: tuple[int, int]):
    """``name=(value, minimum)``: a :class:`ConfigError` naming ``--name`` for the first value below its minimum."""
    for name, (value, minimum) in checks.items():
        if value < minimum:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} must be >= {minimum}, got {value}; e.g. {flag} {max(minimum, 1)}")
