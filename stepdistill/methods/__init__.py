"""Distillation methods: the objectives the training loop optimises, found by name in ``METHODS``.

``METHODS`` is the one place that lists the methods: config validation (``method: ...``), the training loop
(:func:`build_objective`), and through each objective's model card the adapter header that
`stepdistill sample` / `eval` read their sampler from. Adding a method: a module here with a class that has
the members listed in :mod:`stepdistill.methods.base`, and one line below.
"""
from __future__ import annotations

from ..errors import ConfigError
from .adversarial import AdversarialObjective
from .lcd import LCDObjective
from .levers import check_levers
from .reflow import ReflowObjective

METHODS = {
    "lcd": LCDObjective,
    "reflow": ReflowObjective,
    "adversarial": AdversarialObjective,
}


def method_class(name: str):
    if name not in METHODS:
        raise ConfigError(f"method must be one of {sorted(METHODS)}, got {name!r}")
    return METHODS[name]


def check_config(config):
    """The method's own checks of a config (raises :class:`ConfigError`)."""
    method_class(config.method).check_config(config)
    check_levers(config)  # the knowledge-distillation levers every method takes


def build_objective(config, pipe, accelerator):
    return method_class(config.method)(config, pipe, accelerator)
