"""The sharded latent cache (data/cache.py, version 3): rank-split builds equal one build, a killed build resumes
from its finished shards, rows read back equal what the VAE / text encoder give, and the reader memory-maps shards
one at a time instead of loading the cache."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stepdistill.cli import main
from stepdistill.data.cache import build_cache, load_cache, precompute
from stepdistill.data.sources import Example, iter_examples, load_examples, preprocess
from stepdistill.errors import DataError
from stepdistill.models.family import encode_prompts
from stepdistill.models.latents import native_resolution
from stepdistill.toy.scenes import write_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECIPE = str(Path(__file__).resolve().parent.parent / "configs" / "toy-lcm-lora.yaml")


def _files(cache_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(cache_dir.glob("shard-*.safetensors"))}


def _assert_same_cache(a: Path, b: Path):
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and len(fa) > 1
    for name in fa:
        assert fa[name].keys() == fb[name].keys()
        for k in fa[name]:
            torch.testing.assert_close(fa[name][k], fb[name][k], rtol=0, atol=1e-3, msg=f"{name}:{k}")


def test_cache_built_by_two_ranks_equals_one_built_by_one(tmp_path, monkeypatch):
    """Through the command line: RANK/WORLD_SIZE as torchrun sets them, then --shard-index/--num-shards."""
    common = ["cache", "build", "--config", RECIPE, "train_data=toy:10:3", "--shard-size", "3"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*common, f"output_dir={tmp_path / 'two'}"]) == 0
    assert sorted(p.name for p in (tmp_path / "two" / "cache").iterdir()) == ["shard-00001.safetensors",
                                                                               "shard-00003.safetensors"]
    monkeypatch.setenv("RANK", "0")  # the other rank finishes the set and writes the manifest
    assert main([*common, f"output_dir={tmp_path / 'two'}"]) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert main([*common, f"output_dir={tmp_path / 'one'}", "--shard-index", "0", "--num-shards", "1"]) == 0
    _assert_same_cache(tmp_path / "two" / "cache", tmp_path / "one" / "cache")
    assert len(load_cache(tmp_path / "two" / "cache")) == 10
    assert main([*common, f"output_dir={tmp_path / 'x'}", "--shard-index", "2", "--num-shards", "2"]) == 2


def test_a_killed_build_resumes_from_its_finished_shards(tiny_random_pipe, tmp_path):
    pipe, res = tiny_random_pipe, native_resolution(tiny_random_pipe)
    data = write_image_folder(tmp_path / "data", 8, seed=1)
    good = load_examples(str(data))

    def dies_at_6():  # the build is killed while encoding shard 2 (examples 6, 7)
        for i, ex in enumerate(iter_examples(str(data))):
            if i == 6:
                raise KeyboardInterrupt
            yield ex

    with pytest.raises(KeyboardInterrupt):
        build_cache(pipe, dies_at_6(), res, tmp_path / "cache", shard_size=3, progress=False)
    cache = tmp_path / "cache"
    assert not (cache / "manifest.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in cache.glob("shard-*")}
    assert sorted(done) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    with pytest.raises(DataError, match="no readable manifest"):
        load_cache(cache)
    plan = build_cache(pipe, good, res, cache, shard_size=3, progress=False)
    assert plan.encoded == ["shard-00002.safetensors"]  # the finished shards were skipped, not re-encoded
    assert all(p.stat().st_mtime_ns == done[p.name] for p in cache.glob("shard-*") if p.name in done)
    precompute(pipe, good, res, tmp_path / "fresh", shard_size=3)
    _assert_same_cache(cache, tmp_path / "fresh")
    assert build_cache(pipe, good, res, cache, progress=False).encoded == []  # reused whole (shard size recorded)


def test_rows_read_back_equal_what_was_encoded_and_the_reader_maps_shards_lazily(tiny_random_pipe, tmp_path):
    pipe, res = tiny_random_pipe, native_resolution(tiny_random_pipe)
    examples = load_examples(str(write_image_folder(tmp_path / "data", 7, seed=2)))
    examples[5] = Example(examples[5].load_image, examples[1].caption, examples[5].name, examples[5].stamp)
    cache = precompute(pipe, examples, res, tmp_path / "cache", shard_size=3)
    assert len(cache) == 7 and set(cache._handles) == {0}  # shard 0 only (the unconditional embedding)
    arrays = [v for v in vars(cache).values() if isinstance(v, (torch.Tensor, np.ndarray))]
    assert all(np.size(a) <= len(cache.shards) + 1 for a in arrays)  # the shard offsets only: no rows in memory

    row = cache.row(5)  # opens shard 1 only
    assert set(cache._handles) == {0, 1}
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / "cache" / "shard-00001.safetensors") in maps  # memory-mapped, not read
    assert str(tmp_path / "cache" / "shard-00002.safetensors") not in maps
    with torch.no_grad():
        post = pipe.vae.encode(torch.from_numpy(preprocess(examples[5].load_image(), res))[None]).latent_dist
        emb = encode_prompts(pipe, [examples[5].caption, ""])["prompt_embeds"]
    torch.testing.assert_close(row["mean"], post.mean[0].half().float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(row["std"], torch.exp(0.5 * post.logvar[0].half().float()), rtol=2e-3, atol=1e-6)
    torch.testing.assert_close(row["encoder_hidden_states"], emb[0].half().float(), rtol=0, atol=2e-3)
    torch.testing.assert_close(cache.uncond["encoder_hidden_states"], emb[1].half().float(), rtol=0, atol=2e-3)
    assert row["mean"].dtype == torch.float32
    assert torch.equal(cache.row(1)["encoder_hidden_states"], row["encoder_hidden_states"])  # same caption
    with pytest.raises(IndexError):
        cache.row(7)


def test_a_shard_of_another_build_is_refused_on_load_with_the_fix(tiny_random_pipe, tmp_path):
    pipe, res = tiny_random_pipe, native_resolution(tiny_random_pipe)
    a = load_examples(str(write_image_folder(tmp_path / "a", 4, seed=1)))
    b = load_examples(str(write_image_folder(tmp_path / "b", 4, seed=2)))
    precompute(pipe, a, res, tmp_path / "ca", shard_size=2)
    precompute(pipe, b, res, tmp_path / "cb", shard_size=2)
    (tmp_path / "cb" / "shard-00001.safetensors").replace(tmp_path / "ca" / "shard-00001.safetensors")
    with pytest.raises(DataError, match=r"shard-00001.safetensors belongs to another cache build.*cache build"):
        load_cache(tmp_path / "ca")
