"""The library's shape (docs/architecture.md): imports flow one way through the layers, each folder is one idea,
no import cycles, no hidden in-function imports of the library, no module over 500 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "stepdistill"

# Bottom to top. A module may import from its own group and from groups below it, never from above or from
# another group of its own layer.
LAYERS = [
    {"core": ["__init__", "errors", "atomic", "parametrization", "solvers", "lcd", "reflow", "ode",
              "flow_scheduler", "adversarial", "engines"]},
    {"toy": ["toy"]},
    {"models": ["models"]},
    {"data": ["data"], "lora": ["lora"]},
    {"sampling": ["sampling"]},
    {"methods": ["methods"]},
    {"training": ["training"], "eval": ["eval"]},
    {"experiments": ["experiments"]},
    {"cli": ["cli"]},
]
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _package_of(name: str, path: Path) -> list[str]:
    parts = [] if name == "__init__" else name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _resolve(name: str, path: Path, node: ast.ImportFrom | ast.Import, modules: dict[str, Path]) -> list[str]:
    """The library modules an import statement reaches (submodules named in ``from X import a`` included)."""
    targets = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == "stepdistill" or alias.name.startswith("stepdistill."):
                targets.append(alias.name.split(".", 1)[1] if "." in alias.name else "__init__")
        return targets
    if node.level == 0:
        if not (node.module or "").startswith("stepdistill"):
            return []
        base = node.module.split(".")[1:]
    else:
        pkg = _package_of(name, path)
        base = pkg[: len(pkg) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    mod = ".".join(base) or "__init__"
    for alias in node.names:
        sub = f"{mod}.{alias.name}" if mod != "__init__" else alias.name
        targets.append(sub if sub in modules else mod)
    return targets


def _imports(modules: dict[str, Path]):
    """``(module, target, lineno, in_function, line_text)`` for every import in ``modules``."""
    rows = []
    for name, path in modules.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        in_function = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        in_function.add(id(sub))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                inner = id(node) in in_function
                src = " ".join(lines[node.lineno - 1:node.end_lineno])
                targets = _resolve(name, path, node, modules)
                if not targets:
                    rows.append((name, None, node.lineno, inner, src))
                for t in targets:
                    rows.append((name, t, node.lineno, inner, src))
    return rows


IMPORTS = _imports(MODULES)


def _group(module: str) -> tuple[int, str]:
    head = module.split(".")[0]
    for level, groups in enumerate(LAYERS):
        for group, members in groups.items():
            if head in members or module in members:
                return level, group
    raise AssertionError(f"module {module} is in no layer of tests/test_architecture.py: place it there and in "
                         "docs/architecture.md")


def test_every_module_has_a_layer():
    for module in MODULES:
        _group(module)


def test_imports_flow_down_the_layers():
    bad = []
    for module, target, lineno, _, src in IMPORTS:
        if target is None:
            continue
        (lm, gm), (lt, gt) = _group(module), _group(target)
        if lt > lm or (lt == lm and gt != gm):
            bad.append(f"{module}:{lineno} ({gm}, layer {lm}) imports {target} ({gt}, layer {lt}): {src.strip()}")
    assert not bad, "imports that climb or cross layers:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: set() for m in MODULES}
    for module, target, *_ in IMPORTS:
        if target is not None and target != module:
            graph[module].add(target)
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_in_function_imports_are_only_commented_optional_dependencies():
    bad = [f"{m}:{lineno}: {src.strip()}" for m, target, lineno, inner, src in IMPORTS
           if inner and (target is not None or "#" not in src)]
    assert not bad, ("in-function imports must be optional third-party packages with a comment saying why; "
                     "import the library at the top of the module:\n" + "\n".join(bad))


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_size(module):
    n = len(MODULES[module].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[module]} has {n} lines (> {MAX_LINES}): split it by idea"


def test_the_architecture_test_would_catch_a_climb_and_an_inner_import(tmp_path):
    """Negative control: the parser sees a climbing import and an in-function library import in a made-up tree."""
    fake = tmp_path / "stepdistill"
    (fake / "models").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "models" / "__init__.py").write_text("")
    (fake / "models" / "a.py").write_text("from ..cli import x\n")
    (fake / "models" / "b.py").write_text("x = 1\n")
    (fake / "models" / "c.py").write_text("def f():\n    from . import b\n")
    (fake / "cli.py").write_text("x = 1\n")
    modules = {}
    for path in fake.rglob("*.py"):
        parts = list(path.relative_to(fake).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)] = path
    rows = _imports(modules)
    assert ("models.a", "cli") in [(m, t) for m, t, *_ in rows if t and _group(t)[0] > _group(m)[0]]
    assert ("models.c", "models.b") in [(m, t) for m, t, _, inner, _ in rows if inner and t]
