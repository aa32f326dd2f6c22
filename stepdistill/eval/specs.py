"""Method specs of `stepdistill eval` (``--method``, repeatable)::

    SPEC    := [NAME "="] [LORAS] [":" SAMPLER] (":" OPTION)*
    LORAS   := LORA ("+" LORA)*          LORA := PATH ["@" WEIGHT]
    OPTION  := steps=1,2,4 | guidance=1.5 | windows=4 | eta=0.3

``teacher`` (or ``teacher:ddim``, or any spec without LoRAs) is the base model: default sampler DDIM
(trailing spacing below 25 steps), steps ``--teacher-steps`` (25,50), guidance ``--teacher-guidance``
(toy prompts: ``TOY_GUIDANCE``; otherwise 7.5). A spec with LoRAs is a student: default steps
``--student-steps`` (1,2,4,8), guidance 1.0, default sampler from the LoRA's header
(:func:`stepdistill.sampling.sampler_from_lora`: ``lcd`` -> ``lcm``, ``reflow`` -> ``perflow``). Samplers:
``ddim``, ``lcm``, ``tcd``, ``perflow`` (:class:`~stepdistill.flow_scheduler.PiecewiseRectifiedFlowScheduler`,
``num_windows`` from the option ``windows=``, else the LoRA's ``stepdistill.num_windows`` metadata, else 4), and
the other keys of :data:`stepdistill.sampling.SCHEDULERS`. Examples::

    teacher                          lcd=out/lora:lcm              reflow=out/lora-reflow:perflow
    lcd-tcd=out/lora:tcd:eta=0.3     lcd=out/lora:lcm:steps=1,2,4  teacher-few=:ddim:steps=2,4,8
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import StepdistillError
from ..sampling import DEFAULT_NUM_WINDOWS, SCHEDULERS, lora_metadata, sampler_from_lora

STUDENT_STEPS = (1, 2, 4, 8)
TEACHER_STEPS = (25, 50)
SAMPLERS = ("ddim", "lcm", "tcd", "perflow") + tuple(k for k in SCHEDULERS if k not in ("ddim", "lcm", "tcd"))
QUALITY_KEYS = ("prompt_accuracy", "toy_fid", "fid", "clip_score")
_OPTION_KEYS = ("steps", "guidance", "windows", "eta")


class SpecError(StepdistillError, ValueError):
    """A ``--method`` spec that cannot be parsed; the message shows the syntax."""


SPEC_HELP = ("[NAME=][LORA[@WEIGHT][+LORA...]][:SAMPLER][:steps=1,2,4][:guidance=G][:windows=K][:eta=E]; "
             "e.g. 'teacher', 'lcd=out/lora:lcm', 'reflow=out/lora-reflow:perflow'")


@dataclass
class MethodSpec:
    name: str
    loras: list[tuple[str, float]] = field(default_factory=list)
    sampler: str | None = None          # None: from the LoRA metadata (students) or "ddim" (teacher)
    steps: tuple[int, ...] | None = None
    guidance: float | None = None
    num_windows: int | None = None
    eta: float | None = None

    @property
    def is_teacher(self) -> bool:
        return not self.loras


def parse_method(spec: str) -> MethodSpec:
    """Parse one ``--method`` spec (see the module docstring)."""
    text = spec.strip()
    if not text:
        raise SpecError(f"empty method spec; expected {SPEC_HELP}")
    parts = text.split(":")
    head, rest = parts[0], parts[1:]
    sampler, options = None, {}
    for i, part in enumerate(rest):
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in _OPTION_KEYS:
                raise SpecError(f"unknown option {key!r} in method spec {spec!r}; options: {_OPTION_KEYS}; "
                                f"syntax: {SPEC_HELP}")
            options[key] = value
        elif i == 0:
            sampler = part.strip().lower() or None
        else:
            raise SpecError(f"unexpected {part!r} in method spec {spec!r}; syntax: {SPEC_HELP}")
    if sampler is not None and sampler not in SAMPLERS:
        raise SpecError(f"unknown sampler {sampler!r} in {spec!r}; choose one of {list(SAMPLERS)}")
    if "=" in head:
        name, lora_text = head.split("=", 1)
    elif head == "teacher" or head == "":
        name, lora_text = head or "teacher", ""
    else:
        lora_text = head
        name = _default_name(head)
    name = name.strip()
    if not name or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise SpecError(f"method name {name!r} in {spec!r} must be letters, digits, '.', '_' or '-'")
    loras = []
    for item in filter(None, lora_text.split("+")):
        path, at, weight = item.rpartition("@")
        if at:
            try:
                loras.append((path, float(weight)))
            except ValueError as e:
                raise SpecError(f"LoRA weight {weight!r} in {spec!r} is not a number") from e
        else:
            loras.append((item, 1.0))
    try:
        steps = tuple(int(s) for s in options["steps"].split(",") if s) if "steps" in options else None
        guidance = float(options["guidance"]) if "guidance" in options else None
        windows = int(options["windows"]) if "windows" in options else None
        eta = float(options["eta"]) if "eta" in options else None
    except ValueError as e:
        raise SpecError(f"bad option value in {spec!r}: {e}; syntax: {SPEC_HELP}") from e
    if steps is not None and (not steps or min(steps) < 1):
        raise SpecError(f"steps in {spec!r} must be positive integers")
    return MethodSpec(name, loras, sampler, steps, guidance, windows, eta)


def _default_name(lora_text: str) -> str:
    p = Path(lora_text.split("+")[0].rpartition("@")[0] or lora_text.split("+")[0])
    base = p.parent.name if p.suffix == ".safetensors" else p.name
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", base) or "student"


def resolve_method(spec: MethodSpec, teacher_steps, student_steps, teacher_guidance: float) -> dict:
    """Fill a spec's defaults: sampler, steps, guidance, num_windows (reads the LoRAs' metadata)."""
    meta = lora_metadata(spec.loras) if spec.loras else []
    kinds = {m.get("stepdistill.method", "") for m in meta} - {""}
    lora_sampler, lora_windows = sampler_from_lora(meta)
    sampler = spec.sampler
    if sampler is None:
        sampler = "ddim" if spec.is_teacher else (lora_sampler if len(kinds) == 1 else None)
        if sampler is None:
            raise SpecError(f"method {spec.name!r}: cannot tell the sampler from the LoRA metadata "
                            f"(stepdistill.method = {sorted(kinds) or 'absent'}); add ':lcm', ':tcd' or ':perflow'")
    num_windows = None
    if sampler == "perflow":
        num_windows = spec.num_windows or lora_windows or DEFAULT_NUM_WINDOWS
    steps = spec.steps or (tuple(teacher_steps) if spec.is_teacher else tuple(student_steps))
    guidance = spec.guidance if spec.guidance is not None else (teacher_guidance if spec.is_teacher else 1.0)
    return {"name": spec.name, "loras": [[p, w] for p, w in spec.loras], "sampler": sampler,
            "steps": sorted(set(steps)), "guidance": guidance, "num_windows": num_windows, "eta": spec.eta,
            "lora_methods": sorted(kinds)}




def baseline_for(resolved: dict) -> dict:
    """The honest baseline of a resolved student: the base model with no adapter, under the student's own sampler,
    steps, guidance, windows and eta (named ``<student>-base``)."""
    return {**resolved, "name": f"{resolved['name']}-base", "loras": [], "lora_methods": [],
            "baseline_of": resolved["name"]}
