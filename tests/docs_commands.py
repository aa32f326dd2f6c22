"""The commands and Python snippets of README.md and docs/*.md, and the checks `tests/test_docs.py` runs on them.

* A fenced ``bash``/``sh`` block is run, command by command, in one scratch directory per test session (README
  first, then docs/ in name order, so later commands find what earlier ones wrote), with ``STEPDISTILL_SMOKE=1``
  (toy-sized sizes, the same command line otherwise: stepdistill/cli/smoke.py). A command the suite cannot run
  carries a marker in its comment, ``[needs: real weights]``, ``[needs: a GPU]``, ``[needs: several GPUs]`` or
  ``[needs: network]``; an unknown marker is an error. The CI command itself (``make test``, read from .ci/run)
  is checked against .ci/run instead of being run inside itself.
* Every command anywhere in the docs (fenced, indented, inline code, ``text`` synopses), marked or not, has its
  subcommands and flags checked against the real parsers (stepdistill's argparse tree, ``accelerate launch``'s
  parser, a script's ``--help``), its Makefile targets and the repository paths it names (configs/, train/,
  bench/) checked to exist.
* Fenced ``python`` blocks run after the shell commands, in the same directory, with the SD-1.5 model ids (and
  the ``BASE`` placeholder) replaced by the embedded toy teacher (an SD-1.5 drop-in), CUDA by the CPU and fp16 by
  fp32 (:data:`SNIPPET_SUBSTITUTIONS`).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
MARKER = re.compile(r"\[needs: ([^\]]+)\]")
KNOWN_NEEDS = {"real weights", "a GPU", "several GPUs", "network"}
COMMAND_HEAD = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(stepdistill|python3?|accelerate|make|bash|torchrun|pip)\s")
REPO_PATH = re.compile(r"^(configs|train|bench)/[\w./-]+$")
SMOKE_ENV = {"STEPDISTILL_SMOKE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class DocCommand:
    doc: str
    line: int
    text: str
    runnable: bool  # from a fenced shell block (else: checked only)
    needs: str | None = None

    def __str__(self):
        return f"{self.doc}:{self.line}: {self.text}"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def fenced_blocks(text: str):
    """``(lang, first_line_number, lines)`` of each fenced block, and ``(None, n, [line])`` for prose lines."""
    lines, i = text.splitlines(), 0
    while i < len(lines):
        m = re.match(r"^\s*```\s*([\w-]*)", lines[i])
        if m:
            lang, start, body = m.group(1).lower(), i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            yield lang, start, body
        else:
            yield None, i + 1, [lines[i]]
        i += 1


def _join_continuations(lines: list[str], start: int):
    """Logical lines (backslash continuations joined) with their first line number."""
    buf, first = "", None
    for n, line in enumerate(lines, start):
        if first is None:
            first = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield first, buf + line
        buf, first = "", None
    if buf:
        yield first, buf


def _comment(line: str) -> str:
    """The part of a shell line after an unquoted ``#``."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[i + 1:]
    return ""


def commands(path: Path) -> list[DocCommand]:
    doc = str(path.relative_to(REPO))
    found, prose = [], []
    for lang, start, body in fenced_blocks(path.read_text(encoding="utf-8")):
        if lang in SHELL_LANGS or lang == "text":
            for n, line in _join_continuations(body, start):
                code = line.strip()
                if not code or code.startswith("#"):
                    continue
                if lang == "text" and not COMMAND_HEAD.match(code):
                    continue
                marker = MARKER.search(_comment(code))
                found.append(DocCommand(doc, n, code, runnable=lang in SHELL_LANGS,
                                        needs=marker.group(1) if marker else None))
        elif lang is None:  # prose: inline code spans (a span may cross a line break) and indented code lines
            line = body[0]
            if line.startswith("    ") and not line.lstrip().startswith(("-", "*", "|")):
                if COMMAND_HEAD.match(line.strip() + " "):
                    found.append(DocCommand(doc, start, line.strip().rstrip("\\"), runnable=False))
                continue
            prose.append((start, line))
            continue
        found += _inline_commands(doc, prose)
        prose = []
    return found + _inline_commands(doc, prose)


def _inline_commands(doc: str, prose: list[tuple[int, str]]) -> list[DocCommand]:
    """Commands in inline code spans of a run of prose lines."""
    text = "\n".join(line for _, line in prose)
    out = []
    for m in re.finditer(r"`([^`]+)`", text):
        span = " ".join(m.group(1).split())
        if COMMAND_HEAD.match(span + " "):
            out.append(DocCommand(doc, prose[text.count("\n", 0, m.start())][0], span, runnable=False))
    return out


def config_commands() -> list[DocCommand]:
    """The commands in the comments of configs/*.yaml (checked, not run)."""
    found = []
    for path in sorted((REPO / "configs").glob("*.yaml")):
        lines = [ln[1:] if ln.startswith("#") else "" for ln in path.read_text(encoding="utf-8").splitlines()]
        for n, line in _join_continuations(lines, 1):
            code = line.strip()
            m = re.search(r"(stepdistill|accelerate launch|python train/)\s.*", code)
            if m and m.start() == 0:
                found.append(DocCommand(str(path.relative_to(REPO)), n, code.split("  (")[0], runnable=False))
    return found


def python_snippets(path: Path) -> list[tuple[str, int, str]]:
    doc = str(path.relative_to(REPO))
    return [(doc, start, "\n".join(body)) for lang, start, body in fenced_blocks(path.read_text(encoding="utf-8"))
            if lang == "python"]


def ci_command() -> str:
    lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd "))][-1]


# ----------------------------------------------------------------------------------------------- flag checks
def _tokens(text: str) -> list[str]:
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        tokens = text.split()
    while tokens and re.match(r"^[A-Z_]+=", tokens[0]):  # VAR=value prefixes
        tokens.pop(0)
    return tokens


def _flags(tokens: list[str]) -> list[str]:
    return [f for t in tokens for f in re.findall(r"(?<![\w-])(--[a-zA-Z0-9][\w-]*)", t)]


@lru_cache(maxsize=1)
def _stepdistill_parser():
    from stepdistill.cli import build_parser
    return build_parser()


def _subparsers(parser):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def stepdistill_problems(args: list[str]) -> list[str]:
    parser, path = _stepdistill_parser(), ["stepdistill"]
    rest = list(args)
    while rest and _subparsers(parser):
        name = rest[0]
        if name.startswith("-"):
            break
        choices = _subparsers(parser)
        names = [n for n in re.split(r"[|]", name)]  # `reflow couple|train` in prose
        if not all(n in choices for n in names):
            return [f"`{' '.join(path)}` has no subcommand {name!r} (has: {', '.join(sorted(choices))})"]
        parser, path, rest = choices[names[0]], path + [names[0]], rest[1:]
    known = set(parser._option_string_actions) | {"--debug"}
    return [f"`{' '.join(path)}` has no flag {f}" for f in _flags(rest) if f not in known]


@lru_cache(maxsize=None)
def _script_help(script: str) -> str:
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    return out.stdout + out.stderr


def script_problems(script: str, args: list[str]) -> list[str]:
    if not (REPO / script).is_file():
        return [f"{script} does not exist"]
    if script == "train/distill.py":
        return stepdistill_problems(["distill", *args])
    help_text = _script_help(script)
    return [f"{script} has no flag {f}" for f in _flags(args) if f not in help_text]


def accelerate_problems(args: list[str]) -> list[str]:
    if args[:1] != ["launch"]:
        return []
    from accelerate.commands.launch import launch_command_parser
    i = next((k for k, t in enumerate(args) if t.endswith(".py")), None)
    if i is None:
        return ["`accelerate launch` without a script"]
    known = set(launch_command_parser()._option_string_actions)
    problems = [f"`accelerate launch` has no flag {f}" for f in _flags(args[1:i]) if f not in known]
    for k, t in enumerate(args[1:i]):  # --config_file PATH
        if t in ("--config_file", "--config-file") and 1 + k + 1 < i and not (REPO / args[2 + k]).exists():
            problems.append(f"{args[2 + k]} does not exist")
    return problems + script_problems(args[i], args[i + 1:])


def make_problems(args: list[str]) -> list[str]:
    targets = {m.group(1) for m in re.finditer(r"^([\w.-]+):", (REPO / "Makefile").read_text(), re.M)}
    return [f"the Makefile has no target {t!r}" for t in args if "=" not in t and not t.startswith("-")
            and t not in targets]


def problems(cmd: DocCommand) -> list[str]:
    """What no longer fits in a documented command: unknown subcommands or flags, missing targets or files."""
    found = []
    if cmd.needs is not None and cmd.needs not in KNOWN_NEEDS:
        found.append(f"unknown marker [needs: {cmd.needs}] (known: {', '.join(sorted(KNOWN_NEEDS))})")
    tokens = _tokens(cmd.text)
    if not tokens:
        return found
    head, args = tokens[0], tokens[1:]
    if head == "stepdistill":
        found += stepdistill_problems(args)
    elif head in ("python", "python3") and args and args[0].endswith(".py"):
        found += script_problems(args[0], args[1:])
    elif head == "accelerate":
        found += accelerate_problems(args)
    elif head == "make":
        found += make_problems(args)
    elif head in ("bash", "torchrun"):
        scripts = [t for t in args if t.endswith((".sh", ".py"))]
        found += [f"{s} does not exist" for s in scripts if not (REPO / s).is_file()]
    found += [f"{t} does not exist" for t in tokens if REPO_PATH.match(t) and not (REPO / t).exists()
              and not t.startswith("bench/RESULTS")]
    return found


# ----------------------------------------------------------------------------------------------------- runs
def prepare_workdir(path: Path) -> Path:
    """A scratch directory that looks like the repository root (links to its files), so documented relative
    paths (configs/..., train/..., out/...) work and outputs land in the scratch directory."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("configs", "train", "bench", "docs", "stepdistill", "Makefile", "pyproject.toml",
                 "constraints.txt", ".venv"):
        if (REPO / name).exists() and not (path / name).exists():
            (path / name).symlink_to(REPO / name)
    return path


def _env() -> dict:
    env = {**os.environ, **SMOKE_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@contextlib.contextmanager
def _in_dir(path: Path, env: dict):
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    os.chdir(path)
    os.environ.update(env)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


def run_command(cmd: DocCommand, workdir: Path, timeout: int = 600) -> str | None:
    """Run a documented command toy-sized; ``None`` when it succeeded, else what went wrong (last lines)."""
    tokens = _tokens(cmd.text)
    if tokens and tokens[0] == "stepdistill":  # in this process: no second torch import per command
        from stepdistill.cli import main
        err = io.StringIO()
        with _in_dir(workdir, SMOKE_ENV), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(tokens[1:])
            except SystemExit as e:  # argparse
                rc = e.code
        tail = " | ".join(err.getvalue().strip().splitlines()[-3:])
        return None if rc == 0 else f"exit {rc}: {tail}"
    if tokens[:1] == ["make"] and not (REPO / ".venv" / ".installed").exists():
        return None if os.environ.get("STEPDISTILL_DOCS_ALLOW_NO_VENV") else \
            "make needs the repository's .venv (run `make test`, which creates it)"
    out = subprocess.run(["bash", "-c", cmd.text], cwd=workdir, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    tail = " | ".join((out.stdout + out.stderr).strip().splitlines()[-3:])
    return None if out.returncode == 0 else f"exit {out.returncode}: {tail}"


SNIPPET_SUBSTITUTIONS = {
    '"stable-diffusion-v1-5/stable-diffusion-v1-5"': "TOY",
    '"BASE"': "TOY",
    '"out/sd15-lcm-lora"': '"out/toy-lcm"',  # the README's SD-1.5 adapter -> the README's toy adapter
    '.to("cuda")': '.to("cpu")',
    "torch.float16": "torch.float32",
}


def run_snippet(code: str, workdir: Path) -> str | None:
    from stepdistill.toy.world import toy_teacher_path
    for old, new in SNIPPET_SUBSTITUTIONS.items():
        code = code.replace(old, repr(toy_teacher_path()) if new == "TOY" else new)
    with _in_dir(workdir, SMOKE_ENV):
        try:
            exec(compile(code, "<doc snippet>", "exec"), {"__name__": "__doc_snippet__"})
        except Exception as e:  # noqa: BLE001 - reported as the snippet's failure
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None
