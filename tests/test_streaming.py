"""``data_mode: streaming``: images read while training from WebDataset shards (or any source), split over processes
and DataLoader workers, with exact resume (stepdistill/data/streaming.py, methods.base.StreamedBatches)."""
from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch
from resume_check import check_resume_is_exact
from torch.utils.data import DataLoader

from stepdistill.data.sources import iter_examples
from stepdistill.data.streaming import StreamingExamples, StreamState
from stepdistill.errors import ConfigError, DataError
from stepdistill.training.config import load_config

wds = pytest.importorskip("webdataset")  # installed by `make test` (the `data` extra)

RES = 16


def write_shards(directory, n_shards: int, per_shard: int) -> str:
    """``n_shards`` WebDataset shards of toy images (PNG + txt); returns the brace pattern."""
    directory.mkdir(parents=True, exist_ok=True)
    examples = iter_examples(f"toy:{n_shards * per_shard}:3:unique")
    for s in range(n_shards):
        with wds.TarWriter(str(directory / f"shard-{s:03d}.tar")) as sink:
            for i, ex in zip(range(per_shard), examples):
                buf = io.BytesIO()
                ex.load_image().save(buf, format="PNG")
                sink.write({"__key__": f"{s:03d}-{i:04d}", "png": buf.getvalue(), "txt": ex.caption})
    return str(directory / f"shard-{{000..{n_shards - 1:03d}}}.tar")


def captions(stream, n: int) -> list[str]:
    return [row["caption"] for row in itertools.islice(stream, n)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("wds"), n_shards=4, per_shard=5)


def test_split_shards_are_disjoint_over_processes_and_workers(shards):
    """Without resampling, the 4 streams of 2 processes x 2 workers each read their own shard of every epoch."""
    seen = []
    for rank in (0, 1):
        data = StreamingExamples(shards, RES, seed=1, rank=rank, world=2, num_workers=2, resample=False)
        for local in (0, 1):
            seen.append(captions(data.iter_stream(local), 5))  # one shard
    assert all(len(set(c)) == 5 for c in seen)
    assert len(set().union(*map(set, seen))) == 20  # every sample once, nobody overlaps
    with pytest.raises(DataError, match="streaming_resample"):
        StreamingExamples(shards, RES, seed=1, world=3, num_workers=2, resample=False)


def test_resampled_streams_are_seeded_and_distinct(shards):
    a = StreamingExamples(shards, RES, seed=1, world=2, num_workers=2)
    again = StreamingExamples(shards, RES, seed=1, world=2, num_workers=2)
    assert captions(a.iter_stream(0), 12) == captions(again.iter_stream(0), 12)
    assert captions(a.iter_stream(0), 12) != captions(a.iter_stream(1), 12)
    row = next(a.iter_stream(1))
    assert row["pixel_values"].shape == (3, RES, RES) and row["pixel_values"].dtype == torch.float32
    assert row["stream_position"].tolist() == [1, 0, 0]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_restarted_loader_continues_exactly(shards, workers):
    """Positions recorded from consumed batches + worker rotation: a new DataLoader continues the sequence of
    batches an uninterrupted one yields (the loop's resume, without the training)."""
    def loader(start=None, rotation=0):
        data = StreamingExamples(shards, RES, seed=2, num_workers=workers)
        if start is not None:
            data.start, data.rotation = start, rotation
        return iter(DataLoader(data, batch_size=3, drop_last=True, num_workers=workers))

    full = [b["caption"] for b in itertools.islice(loader(), 7)]
    state = StreamState(1, max(1, workers))
    first = loader()
    for _ in range(3):
        state.consumed(next(first)["stream_position"])
    state.gather(_OneProcess())
    rest = loader(state.start_of(0), rotation=3 % max(1, workers))
    assert [next(rest)["caption"] for _ in range(4)] == full[3:]
    wrong = loader(np.zeros_like(state.start_of(0)))  # a loader that forgot where it was repeats the first batch
    assert next(wrong)["caption"] != full[3]


class _OneProcess:
    device = torch.device("cpu")

    def gather(self, t):
        return t


def test_streaming_config_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="data_mode must be"):
        load_config(None, data_mode="stream")
    with pytest.raises(ConfigError, match="set data_mode: cached"):
        load_config(None, method="reflow", data_mode="streaming", couplings_dir=str(tmp_path))
    state = StreamState(2, 2)
    with pytest.raises(DataError, match="same number of processes and dataloader_num_workers"):
        StreamState(1, 2).load_state_dict(state.state_dict())


def _lcd(model, train_data, **kw):
    def make(out, **more):
        return load_config(None, method="lcd", pretrained_model=model, output_dir=str(out), train_data=train_data,
                           data_mode="streaming", lora_rank=2, train_batch_size=2, learning_rate=1e-3, w_min=1.0,
                           w_max=3.0, validation_steps=0, report_to="none", **kw, **more)
    return make


@pytest.mark.slow
def test_streaming_lcd_resumes_exactly_from_shards_with_workers(tiny_model_dir, tmp_path):
    shards = write_shards(tmp_path / "wds", n_shards=3, per_shard=4)
    full, resumed = check_resume_is_exact(_lcd(tiny_model_dir, shards, dataloader_num_workers=3), tmp_path)
    assert not (full / "cache").exists()  # nothing was cached: the VAE and text encoder ran on each batch
    assert (resumed / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.slow
def test_streaming_lcd_from_a_toy_source_resumes_exactly(tiny_model_dir, tmp_path):
    check_resume_is_exact(_lcd(tiny_model_dir, "toy:12"), tmp_path)


def test_cached_mode_reads_webdataset_shards_lazily(shards):
    examples = list(iter_examples(shards))
    assert len(examples) == 20 and len({ex.caption for ex in examples}) == 20
    assert examples[0].load_image().size == (64, 64) and len({ex.stamp for ex in examples}) == 20


def test_save_to_disk_datasets_in_both_modes(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = list(itertools.islice(iter_examples("toy:6:5:unique"), 6))
    ds = datasets.Dataset.from_dict({"image": [ex.load_image() for ex in rows], "text": [ex.caption for ex in rows]},
                                    features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    got = list(iter_examples(str(tmp_path / "hf")))
    assert [ex.caption for ex in got] == [ex.caption for ex in rows]
    np.testing.assert_array_equal(np.asarray(got[3].load_image()), np.asarray(rows[3].load_image()))
    two = [StreamingExamples(str(tmp_path / "hf"), RES, seed=0, rank=r, world=2) for r in (0, 1)]
    halves = [captions(d.iter_stream(0), 3) for d in two]
    assert sorted(halves[0] + halves[1]) == sorted(ex.caption for ex in rows)
    with pytest.raises(DataError, match="no column 'caption'"):
        next(iter(iter_examples(str(tmp_path / "hf"), caption_column="caption")))


def test_a_bad_sample_in_a_worker_is_a_one_line_error(tmp_path):
    from stepdistill.training.batches import next_batch

    with wds.TarWriter(str(tmp_path / "bad.tar")) as sink:
        sink.write({"__key__": "a", "png": b"not a png", "txt": "a red circle"})
    data = StreamingExamples(str(tmp_path / "bad.tar"), RES, seed=0, num_workers=1)
    with pytest.raises(DataError) as e:
        next_batch(iter(DataLoader(data, batch_size=1, num_workers=1)))
    assert "\n" not in str(e.value) and str(e.value).startswith("cannot read image") and "bad.tar" in str(e.value)


def test_a_streamed_batch_is_encoded_once_per_step(tiny_random_pipe, tmp_path):
    """The adversarial method's LCD term, GAN term and data-loss lever all read the step's batch; streamed, the VAE
    encoder and the text encoder run on it once, and each term still draws its own posterior sample."""
    from accelerate import Accelerator

    from stepdistill.lora import add_lora_to_unet
    from stepdistill.methods import build_objective
    from stepdistill.methods.base import first_batch

    config = load_config(None, method="adversarial", pretrained_model="toy", output_dir=str(tmp_path / "run"),
                         train_data="toy:8", data_mode="streaming", lora_rank=2, train_batch_size=1,
                         gan_loss_weight=1.0, data_loss_weight=0.5, disc_head_channels=8, validation_steps=0,
                         report_to="none")
    objective = build_objective(config, tiny_random_pipe, Accelerator(cpu=True))
    add_lora_to_unet(tiny_random_pipe.unet, rank=2)  # the student (the loop adds it before the first step)
    calls = {"vae": 0, "text": 0}
    hooks = [tiny_random_pipe.vae.encoder.register_forward_hook(lambda *a: calls.__setitem__("vae", calls["vae"] + 1)),
             tiny_random_pipe.text_encoder.register_forward_hook(
                 lambda *a: calls.__setitem__("text", calls["text"] + 1))]
    try:
        batch = first_batch(objective.dataset, objective.device)
        unet = tiny_random_pipe.unet
        loss, logs = objective.loss(unet, unet, batch, torch.Generator().manual_seed(0))
        assert calls == {"vae": 1, "text": 1} and "gan_g" in logs and "data_loss" in logs
        assert torch.isfinite(loss)
        data = objective.distill.data
        a, b = data.latents(batch, torch.Generator().manual_seed(1)), data.latents(batch, torch.Generator().manual_seed(2))
        assert calls["vae"] == 1 and not torch.equal(a, b)  # a fresh posterior draw from the kept encoding
    finally:
        for h in hooks:
            h.remove()
