"""Streaming training data (``data_mode: streaming``): images and captions read while training, for sets too large
to cache (LAION-scale WebDataset shards).

The data of a run is split into *streams*, one per (process, DataLoader worker): stream ``g = rank x W + l`` of
``G = processes x W``. Each stream is an endless sequence of *chunks* read in order:

* **WebDataset shards** (``path/{00000..09999}.tar``): with ``resample`` (the default, as for LAION-scale training)
  chunk ``k`` is the ``k``-th shard drawn by webdataset's :class:`~webdataset.ResampledShards`, seeded per stream
  (``deterministic``, seed from ``SeedSequence((seed, g))``): the streams draw independently, no shard count
  constraint. Without ``resample`` the shards are split by node and worker: stream ``g`` reads shards ``g::G`` of
  each epoch's seeded permutation of the shard list (which needs at least ``G`` shards). A shard is read by
  ``webdataset.tarfile_to_samples``, one sample in memory at a time.
* **Any other source** (``toy:N``, image folders, ``save_to_disk`` datasets): chunk ``k`` is epoch ``k`` of
  :func:`~.sources.iter_examples`; stream ``g`` keeps examples ``g::G`` and loads only their images.

Every sample carries its ``stream_position`` ``(l, chunk, offset)``. The training loop records the position of the
last sample it consumed from each stream (:class:`StreamState`, saved in checkpoints); a resumed run starts each
stream at the next one (reading the skipped part of one chunk only) and rotates the workers so the DataLoader's
round-robin hands out batches in the same order: resume is exact with the same number of processes and workers.
"""
from __future__ import annotations

import io
import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from .sources import (
    import_webdataset,
    is_webdataset,
    iter_examples,
    open_image_bytes,
    preprocess,
    shard_urls,
    webdataset_sample,
)

_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, stream: int) -> int:
    """The 63-bit seed of stream ``stream`` (``SeedSequence((seed, stream))``)."""
    state = np.random.SeedSequence((int(seed) & _MASK64, int(stream))).generate_state(1, np.uint64)[0]
    return int(state) >> 1


def write_webdataset(examples: Iterable, out_dir: str | Path, shard_size: int = 1000,
                     image_format: str = "png") -> list[Path]:
    """Write ``examples`` (:class:`~.sources.Example`) as WebDataset shards ``out_dir/00000.tar, ...`` of
    ``shard_size`` samples (image as ``png``/``jpg`` + caption as ``txt``), each written to a temporary name and
    renamed when complete. Returns the shard paths."""
    wds = import_webdataset()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    it = iter(examples)
    for j in itertools.count():
        chunk = list(itertools.islice(it, shard_size))
        if not chunk:
            break
        path = out_dir / f"{j:05d}.tar"
        tmp = path.with_name(f".{path.name}.tmp")
        with wds.TarWriter(str(tmp)) as sink:
            for i, ex in enumerate(chunk):
                buf = io.BytesIO()
                ex.load_image().save(buf, format="PNG" if image_format == "png" else "JPEG", quality=95)
                sink.write({"__key__": f"{j:05d}{i:05d}", image_format: buf.getvalue(), "txt": ex.caption})
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _webdataset_chunks(urls: list[str], seed: int, stream: int, streams: int, resample: bool) -> Iterator[str]:
    """The endless sequence of shard URLs stream ``stream`` of ``streams`` reads (module docstring)."""
    if resample:
        sampler = import_webdataset().ResampledShards(urls, seed=seed, worker_seed=lambda: stream_seed(seed, stream),
                                      deterministic=True)
        for item in sampler:
            yield item["url"]
        return
    for epoch in itertools.count():
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence((int(seed) & _MASK64, epoch))))
        order = rng.permutation(len(urls))
        for j in order[stream::streams]:
            yield urls[j]


def _shard_samples(url: str, caption_key: str) -> Iterator[tuple]:
    """``(load_image, caption, name)`` of each sample of one WebDataset shard, read one at a time."""
    for sample in import_webdataset().tarfile_to_samples()([{"url": url}]):
        data, caption = webdataset_sample(sample, caption_key, url)
        yield open_image_bytes(data), caption.strip(), f"{url}:{sample.get('__key__')}"


def _source_chunk(source: str, caption_column: str, image_column: str, stream: int, streams: int):
    """One epoch of a non-WebDataset source as stream ``stream`` sees it (its examples ``stream::streams``)."""
    for ex in itertools.islice(iter_examples(source, caption_column, image_column), stream, None, streams):
        yield ex.load_image, ex.caption, ex.name


class StreamingExamples(IterableDataset):
    """The training examples of ``source`` as endless streams (module docstring). Yields dicts with
    ``pixel_values`` (float32 (3, R, R) in [-1, 1]), ``caption`` (str) and ``stream_position`` (int64 ``(l, chunk,
    offset)``). ``rank``/``world``: this process and the number of processes; ``num_workers``: the DataLoader's
    (0: the process reads its one stream itself). Set :attr:`start` (``(W, 2)`` chunk/offset of each local stream's
    next sample) and :attr:`rotation` before iterating to resume."""

    def __init__(self, source: str, resolution: int, seed: int, rank: int = 0, world: int = 1, num_workers: int = 0,
                 resample: bool = True, caption_column: str = "text", image_column: str = "image"):
        self.source, self.resolution, self.seed = source, int(resolution), int(seed)
        self.rank, self.world = int(rank), int(world)
        self.local_streams = max(1, int(num_workers))
        self.resample, self.caption_column, self.image_column = resample, caption_column, image_column
        self.start = np.zeros((self.local_streams, 2), dtype=np.int64)
        self.rotation = 0
        self.urls = shard_urls(source) if is_webdataset(source) else None
        streams = self.world * self.local_streams
        if self.urls is not None and not resample and len(self.urls) < streams:
            raise DataError(f"{source}: {len(self.urls)} shards for {streams} streams ({self.world} processes x "
                            f"{self.local_streams} workers) without resampling; write more shards, use fewer "
                            "dataloader_num_workers, or set streaming_resample: true")
        if self.urls is None:  # a local source: fail now (not in a worker) when it is missing or malformed
            next(iter(iter_examples(source, caption_column, image_column)), None)

    @property
    def streams(self) -> int:
        return self.world * self.local_streams

    def _chunks(self, stream: int) -> Iterator:
        if self.urls is not None:
            key = "txt" if self.caption_column == "text" else self.caption_column
            for url in _webdataset_chunks(self.urls, self.seed, stream, self.streams, self.resample):
                yield _shard_samples(url, key)
            return
        while True:
            yield _source_chunk(self.source, self.caption_column, self.image_column, stream, self.streams)

    def iter_stream(self, local: int, chunk: int = 0, offset: int = 0) -> Iterator[dict]:
        """Local stream ``local`` of this process from ``(chunk, offset)`` on."""
        stream = self.rank * self.local_streams + local
        empty = 0
        for k, samples in enumerate(itertools.islice(self._chunks(stream), chunk, None), start=chunk):
            yielded = False
            for off, (load, caption, name) in enumerate(samples):
                if k == chunk and off < offset:
                    continue  # resumed: these were consumed before the checkpoint
                try:
                    image = load()
                except (UnidentifiedImageError, OSError) as e:
                    raise DataError(f"cannot read image {name}: {e}; remove or replace it") from None
                yielded = True
                yield {"pixel_values": torch.from_numpy(preprocess(image, self.resolution)), "caption": caption,
                       "stream_position": torch.tensor([local, k, off], dtype=torch.int64)}
            empty = 0 if yielded or (k == chunk and offset) else empty + 1
            if empty >= 100:
                raise DataError(f"{self.source}: stream {stream} of {self.streams} read 100 chunks without a "
                                "sample; the source is empty or smaller than the number of streams")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if info is not None and info.num_workers != self.local_streams:
            raise DataError(f"StreamingExamples was built for {self.local_streams} workers, the DataLoader has "
                            f"{info.num_workers}")
        local = (worker + self.rotation) % self.local_streams
        chunk, offset = (int(v) for v in self.start[local])
        return self.iter_stream(local, chunk, offset)


class StreamState:
    """Where each stream of every process stands: the checkpointed state of a streaming run
    (``accelerator.register_for_checkpointing``). :meth:`consumed` records a batch the loop used; :meth:`gather`
    (every process, a collective) collects all processes' positions before a checkpoint is written; after a resume
    :meth:`start_of` gives this process's start positions."""

    def __init__(self, world: int, local_streams: int, rank: int = 0):
        self.rank = rank
        self.local = np.zeros((local_streams, 2), dtype=np.int64)  # next (chunk, offset) of each local stream
        self.all = np.zeros((world, local_streams, 2), dtype=np.int64)

    def consumed(self, positions: torch.Tensor):
        """Record the ``stream_position`` rows of a batch (one stream per batch under DataLoader workers)."""
        for local, chunk, offset in positions.tolist():
            if (chunk, offset + 1) > tuple(self.local[local]):
                self.local[local] = (chunk, offset + 1)

    def gather(self, accelerator):
        mine = torch.from_numpy(self.local).to(accelerator.device)
        self.all = accelerator.gather(mine[None]).cpu().numpy().reshape(self.all.shape)

    def start_of(self, rank: int) -> np.ndarray:
        return self.all[rank].copy()

    def state_dict(self) -> dict:
        return {"positions": torch.from_numpy(self.all.copy())}

    def load_state_dict(self, state: dict):
        positions = state["positions"].numpy().astype(np.int64)
        if positions.shape != self.all.shape:
            world, local = positions.shape[:2]
            raise DataError(f"this checkpoint streamed with {world} processes x {local} streams each; resume a "
                            f"streaming run with the same number of processes and dataloader_num_workers "
                            f"(now {self.all.shape[0]} x {self.all.shape[1]})")
        self.all = positions
        self.local = positions[self.rank].copy()
