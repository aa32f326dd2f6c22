"""Issue 12, one test per row of the table in docs/reliability.md: every bad input is a one-line error (``error:
<problem>; <fix>``, exit code 2), nothing is silently wrong, nothing is lost. Rows about the command line run it as a
subprocess; the independent ones run two at a time (the ``cli`` fixture) so the module stays fast. Tiny random
models and random images only: nothing here depends on the toy teacher's quality."""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from reliability_helpers import (
    one_line_error,
    overrides,
    run_cli,
    run_main,
    save_tiny_model,
    train_kwargs,
    write_image_folder,
)
from safetensors.torch import load_file, save_file

from stepdistill import lora
from stepdistill.cli import main
from stepdistill.data.cache import load_cache, precompute
from stepdistill.data.prompts import read_prompts
from stepdistill.data.sources import load_examples
from stepdistill.errors import CheckpointError, ConfigError, DataError
from stepdistill.lora.layers import lora_targetable_modules
from stepdistill.models.latents import native_resolution
from stepdistill.training.checkpoints import (
    RECORD_FILE,
    list_checkpoints,
    read_record,
    save_checkpoint,
)
from stepdistill.training.config import load_config, parse_override
from stepdistill.training.loop import train

ADAPTER = "pytorch_lora_weights.safetensors"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny kernels: a second thread only spins


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread):
    """A tiny random pipeline on disk, an image folder, and a finished 2-step run with checkpoints 1 and 2."""
    root = tmp_path_factory.mktemp("reliability")
    model = save_tiny_model(root / "tiny")
    data = write_image_folder(root / "data")
    kw = train_kwargs(model, data, root / "cache")
    done = train(load_config(None, output_dir=str(root / "done"), **kw))
    # a LoRA for another base: the tiny UNet's attention layers at twice their width
    modules = lora_targetable_modules(_unet(model))
    layers = {name: (torch.randn(4, m.in_features * 2), torch.randn(m.out_features * 2, 4), 4.0)
              for name, m in modules.items() if name.endswith(("to_q", "to_k")) and isinstance(m, torch.nn.Linear)}
    other = lora.save_lora(root / "other-base.safetensors", layers, base_model_version="sdxl_base_v1-0")
    return SimpleNamespace(root=root, model=model, data=data, kw=kw, done=done, other=other)


def _unet(model: str):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model, subfolder="unet")


def _copy_run(world, name: str) -> Path:
    dst = world.root / name
    shutil.copytree(world.done, dst)
    return dst


def _distill(world, out, *extra, **kw):
    return ["distill", *overrides({**world.kw, "output_dir": out, **kw}), *extra]


@pytest.fixture(scope="module")
def cli(world):
    """The rows about the command line itself, each in its own interpreter, two at a time (an interpreter start
    costs ~5 s). ``{name: CompletedProcess}``."""
    r = world.root
    sample = ["sample", "--model", world.model, "--prompt", "a red circle", "--num-images", "1"]
    commands = {  # the slow ones (training, model loading) first
        "mixed_precision_no": _distill(world, r / "mp", "mixed_precision=no", "learning_rate=1e-3", max_train_steps=1),
        "eval_toy1": ["eval", "--model", world.model, "--prompts", "toy:1", "--method", "teacher:ddim:steps=1",
                      "--out", r / "eval-toy1"],
        "missing_model": _distill(world, _copy_run(world, "missing-model"), "--overwrite",
                                  pretrained_model=r / "no-such-model"),
        "used_dir": _distill(world, _copy_run(world, "used")),
        "resume_none": _distill(world, r / "empty", "--resume", "latest"),
        "fp16": _distill(world, r / "fp16", mixed_precision="fp16"),
        "steps_0": [*sample, "--steps", "0", "--out", r / "steps0.png"],
        "guidance_neg": [*sample, "--steps", "2", "--guidance", "-5", "--out", r / "guidance.png"],
        "debug_flag": ["distill", "--debug", "--config", r / "no-such-recipe.yaml"],
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, args) for name, args in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def _snapshot(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (run / ADAPTER, run / "train_config.json")}


# --------------------------------------------------------------------------------------------------------------
# config values


def test_row_mixed_precision_no_on_the_command_line_trains(world, cli):
    res = cli["mixed_precision_no"]
    assert res.returncode == 0, res.stderr[-3000:]
    recorded = json.loads((world.root / "mp" / "train_config.json").read_text())
    assert recorded["mixed_precision"] == "no" and recorded["learning_rate"] == 1e-3
    assert (world.root / "mp" / ADAPTER).exists()


def test_row_learning_rate_in_scientific_notation_is_a_float(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 1e-4\nmixed_precision: no\nadam_epsilon: 1E-8\nvalidation_step_counts: [1, 2]\n"
                      "report_to: none\n")
    c = load_config(recipe)
    assert (c.learning_rate, c.mixed_precision, c.adam_epsilon, c.validation_step_counts, c.report_to) == (
        1e-4, "no", 1e-8, [1, 2], "none")
    c = load_config(recipe, **dict(parse_override(o) for o in ["learning_rate=1e-3", "max_train_steps=1e3",
                                                               "lora_target_modules=[to_q, to_k]", "cache_dir=null"]))
    assert (c.learning_rate, c.max_train_steps, c.lora_target_modules, c.cache_dir) == (1e-3, 1000, ["to_q", "to_k"],
                                                                                        None)
    recipe.write_text("learning_rate: fast\n")
    with pytest.raises(ConfigError, match=r"r.yaml: config key learning_rate expects a number, got 'fast'"):
        load_config(recipe)
    # the command line: the same check, one line, before anything loads
    assert main(["distill", "max_train_steps=ten", f"output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: config key max_train_steps expects an integer, got 'ten'; e.g. max_train_steps=3"
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------------------------
# the error path


def test_row_distill_sample_eval_errors_are_one_line_and_debug_shows_the_traceback(cli, monkeypatch):
    one_line_error(cli["fp16"])              # distill
    one_line_error(cli["steps_0"])           # sample
    one_line_error(run_main(["eval", "--prompts", "toy:4", "--student-steps", "0"]))  # eval
    res = cli["debug_flag"]
    assert res.returncode == 1 and "Traceback" in res.stderr and "ConfigError: recipe" in res.stderr, res.stderr
    monkeypatch.setenv("STEPDISTILL_DEBUG", "1")
    with pytest.raises(ConfigError, match="--steps must be an integer >= 1"):
        main(["sample", "--prompt", "x", "--steps", "0"])


# --------------------------------------------------------------------------------------------------------------
# the latent cache


def _examples(directory: Path):
    return load_examples(str(directory))


def _rows(cache) -> dict[str, torch.Tensor]:
    """Every row of a (memory-mapped) cache, stacked per key."""
    rows = [cache.row(i) for i in range(len(cache))]
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_row_failed_run_then_rerun_on_the_old_data_rebuilds_the_cache(tiny_random_pipe, tmp_path):
    pipe, res = tiny_random_pipe, native_resolution(tiny_random_pipe)
    old = _examples(write_image_folder(tmp_path / "old", 6, seed=1))
    first = _rows(precompute(pipe, old, res, tmp_path / "cache", model_id="m", shard_size=4))
    new_dir = write_image_folder(tmp_path / "new", 6, seed=2)
    for i, p in enumerate(sorted(new_dir.glob("*.txt"))):
        p.write_text(f"caption number {i}")
    (new_dir / "004.png").write_bytes(b"not a png")  # the new run dies while encoding its latents
    with pytest.raises(DataError, match="004.png"):
        precompute(pipe, _examples(new_dir), res, tmp_path / "cache", model_id="m", shard_size=4)
    assert not (tmp_path / "cache" / "manifest.json").exists()  # invalidated before anything was replaced
    again = precompute(pipe, old, res, tmp_path / "cache", model_id="m", shard_size=4)
    assert len(again) == 6
    again = _rows(again)  # the old captions' embeddings, not the new run's
    assert all(torch.equal(again[k], first[k]) for k in first)


def test_row_replaced_images_with_the_same_names_and_captions_rebuild_the_cache(tiny_random_pipe, tmp_path):
    pipe, res = tiny_random_pipe, native_resolution(tiny_random_pipe)
    data = write_image_folder(tmp_path / "data", 4, seed=1)
    first = _rows(precompute(pipe, _examples(data), res, tmp_path / "cache", model_id="m"))
    image = data / "002.png"
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(image)  # same name, same caption, new pixels
    os.utime(image, ns=(time.time_ns(), time.time_ns() + 10**9))
    second = _rows(precompute(pipe, _examples(data), res, tmp_path / "cache", model_id="m"))
    assert not torch.equal(first["mean"][2], second["mean"][2]) and torch.equal(first["mean"][0], second["mean"][0])
    # a shard whose rows disagree with its manifest is refused on load, and rebuilt by precompute
    shard = tmp_path / "cache" / "shard-00000.safetensors"
    meta = {"fingerprint": json.loads((tmp_path / "cache" / "manifest.json").read_text())["shards"][0]["fingerprint"]}
    save_file({k: v[:3].contiguous() if k in ("mean", "logvar", "caption_index") else v
               for k, v in load_file(str(shard)).items()}, str(shard), metadata=meta)
    with pytest.raises(DataError, match="holds 3 rows, its manifest says 4"):
        load_cache(tmp_path / "cache")
    with pytest.warns(UserWarning, match="rebuilding the latent cache"):
        third = precompute(pipe, _examples(data), res, tmp_path / "cache", model_id="m")
    assert torch.equal(_rows(third)["mean"], second["mean"])


# --------------------------------------------------------------------------------------------------------------
# output directories and checkpoints


def test_row_fresh_run_into_a_used_output_dir_refuses_and_keeps_the_old_run(world, cli):
    one_line_error(cli["used_dir"], "already holds a run", "--overwrite", "--resume latest")
    assert _snapshot(world.root / "used") == _snapshot(world.done)


def test_overwrite_replaces_the_old_run(world):
    out = _copy_run(world, "overwritten")
    old_run = read_record(out / "checkpoint-2")["run_id"]
    train(load_config(None, output_dir=str(out), overwrite=True, **{**world.kw, "max_train_steps": 1}))
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    assert read_record(out / "checkpoint-1")["run_id"] != old_run
    assert json.loads((out / "train_config.json").read_text())["max_train_steps"] == 1


class _FakeAccelerator:
    is_main_process = True  # one process: save_checkpoint's barriers are no-ops

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        Path(path).mkdir(parents=True)
        save_file({"w": torch.zeros(1)}, str(Path(path) / "lora_state.safetensors"))


def test_rotation_deletes_only_the_current_runs_checkpoints(tmp_path):
    acc = _FakeAccelerator()
    save_checkpoint(acc, tmp_path, 30, None, run_id="old")
    for step in range(1, 5):
        save_checkpoint(acc, tmp_path, step, 2, run_id="new")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4", "checkpoint-30"]


def test_row_learning_rate_1e8_stops_with_nothing_written_as_an_adapter(world):
    out = world.root / "nan"
    res = run_main(_distill(world, out, learning_rate=1e8, max_train_steps=6))
    one_line_error(res, "not finite" if "tensors" in res.stderr else "the loss is nan",
                   "stopped without writing an adapter", "last good checkpoint")
    assert not (out / ADAPTER).exists()
    kept = list_checkpoints(out)
    assert kept
    for p in kept:
        assert all(torch.isfinite(t).all() for t in load_file(str(p / "lora_state.safetensors")).values())


def test_row_truncated_latest_checkpoint_falls_back_to_the_previous_one(world):
    out = _copy_run(world, "truncated")
    with open(out / "checkpoint-2" / "lora_state.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match=r"checkpoint-2/lora_state.safetensors is damaged .* previous complete "
                                         r"checkpoint .*checkpoint-1"):
        res = run_main(_distill(world, out, "--resume", "latest", max_train_steps=3))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / ADAPTER).exists() and [p.name for p in list_checkpoints(out)][-1] == "checkpoint-3"


def test_only_checkpoint_truncated_is_an_error_naming_the_file(world):
    out = _copy_run(world, "only-truncated")
    shutil.rmtree(out / "checkpoint-1")
    (out / "checkpoint-2" / "optimizer.bin").write_bytes(b"\0" * 10)
    with pytest.raises(CheckpointError, match=r"checkpoint-2/optimizer.bin is damaged .*no complete checkpoint"):
        train(load_config(None, output_dir=str(out), resume_from_checkpoint="latest", **world.kw))


def test_row_resume_latest_without_a_checkpoint_is_an_error(world, cli):
    one_line_error(cli["resume_none"], "--resume latest: no checkpoint in", "without --resume")
    assert not (world.root / "empty").exists()


def test_row_resume_with_another_lora_rank_is_one_line(world):
    res = run_main(_distill(world, _copy_run(world, "rank"), "--resume", "latest", lora_rank=8, max_train_steps=3))
    one_line_error(res, "checkpoint-2 was trained with other adapter settings", "lora_rank=4 there, 8 here")
    # a checkpoint without the settings record (older versions): the tensor shapes tell
    out = _copy_run(world, "rank-no-record")
    for p in list_checkpoints(out):
        (p / RECORD_FILE).unlink()
    with pytest.raises(ConfigError, match=r"lora_state.safetensors: \d+ LoRA tensors do not fit this run's adapter"):
        train(load_config(None, output_dir=str(out), resume_from_checkpoint="latest",
                          **{**world.kw, "lora_rank": 8, "max_train_steps": 3}))


def test_row_sample_and_eval_with_a_lora_for_another_base_are_one_line(world):
    r = world.root
    (r / "prompts.txt").write_text("a photo of a cat\na photo of a dog\n")
    runs = [["sample", "--model", world.model, "--prompt", "a red circle", "--num-images", "1", "--lora", world.other,
             "--steps", "1", "--out", r / "other.png"],
            ["eval", "--model", world.model, "--prompts", r / "prompts.txt", "--method", f"x={world.other}:lcm:steps=1",
             "--out", r / "eval-other"]]
    for args in runs:
        one_line_error(run_main(args), "other-base.safetensors", "do not match the base model")
    assert not (r / "other.png").exists()


# --------------------------------------------------------------------------------------------------------------
# sample / eval arguments, devices


def test_row_sample_steps_and_guidance_are_checked(world, cli, capsys):
    one_line_error(cli["steps_0"], "--steps must be an integer >= 1, got 0")
    one_line_error(cli["guidance_neg"], "--guidance must be >= 0", "got -5.0")
    assert main(["sample", "--prompt", "x", "--steps", "-3", "--out", str(world.root / "neg.png")]) == 2
    assert capsys.readouterr().err.startswith("error: --steps must be an integer >= 1, got -3")
    assert not any((world.root / n).exists() for n in ("steps0.png", "guidance.png", "neg.png"))


def test_row_eval_with_one_toy_prompt_reports_fid_as_unavailable(world, cli):
    res = cli["eval_toy1"]
    assert res.returncode == 0, res.stderr[-3000:]
    assert "toy_fid n/a" in res.stdout and "toy-FID needs at least 2 prompts" in res.stderr
    cell = json.loads((world.root / "eval-toy1" / "results.json").read_text())["methods"]["teacher"]["cells"]["1"]
    assert cell["toy_fid"] is None


def test_row_fp16_on_cpu_is_refused(world, cli):
    one_line_error(cli["fp16"], "mixed_precision=fp16 needs a CUDA GPU", "bf16")
    assert not (world.root / "fp16").exists()


# --------------------------------------------------------------------------------------------------------------
# data readers


def test_row_undecodable_caption_and_broken_metadata_name_file_and_line(world, tmp_path):
    bad_utf8 = shutil.copytree(world.data, tmp_path / "data-latin1")
    (bad_utf8 / "003.txt").write_bytes("caf\xe9 red circle".encode("latin-1"))
    res = run_main(_distill(world, tmp_path / "out", train_data=bad_utf8, cache_dir=tmp_path / "cache"))
    one_line_error(res, "data-latin1/003.txt:1: not UTF-8 text")
    write_image_folder(tmp_path, 3)
    rows = [json.dumps({"file_name": f"{i:03d}.png", "text": "a red circle"}) for i in range(3)]
    rows[1] = rows[1][:-5]
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:2: not valid JSON"):
        load_examples(str(tmp_path))
    (tmp_path / "prompts.txt").write_bytes(b"a red circle\n\xff\xfe\n")
    with pytest.raises(DataError, match=r"prompts.txt:2: not UTF-8"):
        read_prompts(str(tmp_path / "prompts.txt"))


def test_row_empty_caption_file_is_an_error(tmp_path):
    write_image_folder(tmp_path, 3)
    (tmp_path / "001.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"001.txt is empty; write the caption of 001.png"):
        load_examples(str(tmp_path))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "000.png", "text": ""}) + "\n")
    with pytest.raises(DataError, match=r"metadata.jsonl:1: empty 'text'"):
        load_examples(str(tmp_path))


def test_row_missing_pretrained_model_is_one_line_and_writes_nothing(world, cli):
    one_line_error(cli["missing_model"], "pretrained_model", "no-such-model", "no such directory")
    assert _snapshot(world.root / "missing-model") == _snapshot(world.done)  # even with --overwrite
    assert len(list_checkpoints(world.root / "missing-model")) == 2
