"""Intermediate features of a denoiser: forward hooks on named blocks, and the frozen teacher as the same network
with the student's adapter disabled. Read by the adversarial method's discriminator and by the feature-matching
knowledge-distillation lever."""
from __future__ import annotations

import contextlib

import torch

from ..errors import ConfigError


class FeatureTap:
    """Forward hooks that keep the outputs of named submodules (``"mid_block"``, ``"down_blocks.1"`` ...) of
    ``model`` during a ``with`` block; a block returning a tuple (diffusers' down blocks: hidden states and
    residuals) contributes its first element. ``features`` lists them in ``names`` order."""

    def __init__(self, model, names):
        self.names = list(names)
        self.modules = [submodule(model, n) for n in self.names]
        self._out: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        self._out.clear()
        for name, module in zip(self.names, self.modules):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name):
        def hook(module, args, output):
            self._out[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    @property
    def features(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self._out]
        if missing:
            raise RuntimeError(f"layers {missing} were not run by the forward pass")
        return [self._out[n] for n in self.names]


def submodule(model, name: str):
    """``model.get_submodule(name)`` with a one-line error listing the UNet's top-level blocks."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        blocks = [n for n, _ in model.named_children()]
        raise ConfigError(f"layer {name!r} is not in the {type(model).__name__}; use block names such as "
                          f"'mid_block', 'down_blocks.1', 'up_blocks.0' (its blocks: {', '.join(blocks)})") from None


@contextlib.contextmanager
def adapters_disabled(raw_model):
    """The frozen teacher: the same network with the student's LoRA switched off (peft), restored afterwards."""
    raw_model.disable_adapters()
    try:
        yield
    finally:
        raw_model.enable_adapters()
