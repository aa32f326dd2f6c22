"""Executable docs (issue 14): the commands and snippets of README.md and docs/*.md run, toy-sized, or say what
they need; every documented subcommand, flag, Makefile target and repository path exists. How commands are
found, run and marked: tests/docs_commands.py."""
import pytest

from docs_commands import (
    KNOWN_NEEDS,
    DocCommand,
    ci_command,
    commands,
    config_commands,
    doc_files,
    prepare_workdir,
    problems,
    python_snippets,
    run_command,
    run_snippet,
)

ALL_COMMANDS = [c for path in doc_files() for c in commands(path)]
CHECKED_ONLY = config_commands()  # the commands in configs/*.yaml comments


def test_the_docs_have_commands_to_check():
    runnable = [c for c in ALL_COMMANDS if c.runnable and c.needs is None]
    assert len(runnable) >= 10 and any(c.doc == "README.md" for c in runnable)
    assert len(ALL_COMMANDS) > len(runnable)  # inline and synopsis commands are checked too


@pytest.mark.parametrize("cmd", ALL_COMMANDS + CHECKED_ONLY, ids=lambda c: f"{c.doc}:{c.line}")
def test_documented_command_fits_the_parsers(cmd):
    assert not problems(cmd), f"{cmd}\n  " + "\n  ".join(problems(cmd))


@pytest.fixture(scope="module")
def ran_docs(tmp_path_factory):
    """Run every runnable command in document order, then every Python snippet, in one scratch directory."""
    workdir = prepare_workdir(tmp_path_factory.mktemp("docs") / "repo")
    results = []
    for cmd in ALL_COMMANDS:
        if not cmd.runnable or cmd.needs is not None:
            continue
        if cmd.text.split("#")[0].strip() == ci_command():
            results.append((str(cmd), None))  # CI runs it (.ci/run); running it here would recurse
            continue
        results.append((str(cmd), run_command(cmd, workdir)))
    for path in doc_files():
        for doc, line, code in python_snippets(path):
            results.append((f"{doc}:{line}: python snippet", run_snippet(code, workdir)))
    return results, workdir


def test_documented_commands_and_snippets_run(ran_docs):
    results, _ = ran_docs
    failed = [f"{where}\n    -> {why}" for where, why in results if why is not None]
    assert not failed, f"{len(failed)} of {len(results)} documented commands failed:\n" + "\n".join(failed)
    assert len(results) >= 12


def test_documented_outputs_exist(ran_docs):
    """The files the README promises after its commands (adapters, grids with their prompt lists, the demo's
    report with its baseline block)."""
    import json
    _, wd = ran_docs
    for rel in ("out/toy-lcm/pytorch_lora_weights.safetensors", "out/toy-reflow/pytorch_lora_weights.safetensors",
                "grid.png", "grid.json", "grid4.png", "grid2.png", "out/demo/grid.png", "out/demo/grid.json"):
        assert (wd / rel).is_file(), rel
    report = json.loads((wd / "out/demo/report.json").read_text())
    assert "baseline" in report and "lcd" in report


def test_the_ci_command_is_the_readme_test_command():
    readme = [c.text.split("#")[0].strip() for c in ALL_COMMANDS if c.doc == "README.md" and c.runnable]
    assert ci_command() in readme


# ------------------------------------------------------------------- the checks catch what they should
def _cmd(text, runnable=True, needs=None):
    return DocCommand("doc.md", 1, text, runnable, needs)


@pytest.mark.parametrize("text, expected", [
    ("stepdistill sample --model toy --promt 'a red circle'", "no flag --promt"),
    ("stepdistill smaple --model toy", "no subcommand 'smaple'"),
    ("stepdistill reflow couple --windowz 2", "no flag --windowz"),
    ("stepdistill export IN OUT --format kohya [--bsae MODEL]", "no flag --bsae"),
    ("accelerate launch --multi-gpuu train/distill.py --config configs/sd15-lcm-lora.yaml", "no flag --multi-gpuu"),
    ("accelerate launch train/distill.py --confg configs/sd15-lcm-lora.yaml", "no flag --confg"),
    ("stepdistill distill --config configs/no-such-recipe.yaml", "configs/no-such-recipe.yaml does not exist"),
    ("make deomo", "no target 'deomo'"),
    ("python bench/bench_sampling.py --batchsize 8", "no flag --batchsize"),
])
def test_flag_check_catches_a_stale_command(text, expected):
    found = problems(_cmd(text, runnable=False))
    assert any(expected in p for p in found), found


def test_flag_check_passes_a_good_command_and_refuses_unknown_markers():
    assert not problems(_cmd("stepdistill sample --model toy --lora out/x:0.8 --steps 4 --out g.png"))
    assert not problems(_cmd("stepdistill export IN OUT --format comfy-flow [--base MODEL | --family sd3|flux1]"))
    assert problems(_cmd("stepdistill sample --model toy", needs="a TPU"))
    assert "real weights" in KNOWN_NEEDS


def test_runner_catches_a_failing_command(tmp_path):
    """The README's quick start once ran `sample --lora ...` without a prompt and stopped with an argparse error;
    a command that exits non-zero -- argparse or a one-line `error:` -- is reported with its message."""
    wd = prepare_workdir(tmp_path / "repo")
    why = run_command(_cmd("stepdistill sample --model toy --lora out/nowhere --steps 4 --out g.png"), wd)
    assert why and why.startswith("exit 2") and "error:" in why
    why = run_command(_cmd("stepdistill sample --model toy --steps 4 --out g.png --no-such-flag"), wd)
    assert why and "exit 2" in why
    assert run_command(_cmd("false"), wd).startswith("exit 1")
    assert run_snippet("import nonexistent_module_xyz", wd).startswith("ModuleNotFoundError")


def test_smoke_shrinks_sizes_only():
    from stepdistill.cli import parse_args
    from stepdistill.cli.smoke import shrink_args

    args = parse_args(["stack-eval", "--style", "s", "--accel", "a", "--num-prompts", "96"])
    shrink_args(args)
    assert (args.accel_weights, args.style_weights, args.num_prompts, args.n_reference) == ("0.5,1.0", "0.5,1.0", 4,
                                                                                               32)
    args = parse_args(["transfer-eval", "--accel", "a"])
    shrink_args(args)
    assert (args.finetune_steps, args.finetune_images, args.steps) == (4, 32, 4)  # sampling steps stay
    args = parse_args(["distill", "--config", "configs/toy-lcm-lora.yaml", "train_data=toy:4000:3", "w_min=2"])
    shrink_args(args)
    assert args.overrides == ["train_data=toy:32:3", "w_min=2", "max_train_steps=4"]
