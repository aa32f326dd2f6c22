"""Training data sources: image folders with .txt captions, HF imagefolders (metadata.jsonl), datasets saved
with ``datasets.save_to_disk``, WebDataset shards, and the procedural toy world (``toy:N``).

Every source is an iterator of ``Example(load_image, caption, name, stamp)`` (:func:`iter_examples`; nothing holds
the whole dataset: the toy world draws its scenes one by one and renders an image only when it is loaded, a folder is
walked, ``metadata.jsonl`` is read line by line, a ``save_to_disk`` dataset is read through its caption column only,
and a WebDataset example keeps its image's bytes only until it is dropped). Images are resized/centre-cropped to the
training resolution by ``preprocess``; ``stamp`` (an image file's size and modification time, a hash of in-memory
bytes, or a toy scene's parameters) lets the latent cache notice a replaced image. Problems are reported with the
file (and line) and the fix; an empty caption is an error.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from ..toy.scenes import RESOLUTION, random_scene, render

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Example:
    load_image: Callable[[], Image.Image]
    caption: str
    name: str
    stamp: str = ""  # what identifies this image's content on disk (size and mtime), for the cache fingerprint


def file_stamp(path: Path) -> str:
    """``size:mtime_ns`` of a file (the latent cache's change detector); DataError when it is missing."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}; check the path") from None
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; a file that is not UTF-8 raises :class:`DataError` naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8"
                        ) from None


def _open_image(path: Path):
    def load():
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot read image {path}: {e}; remove or replace the file") from e
    return load


def iter_toy_examples(n: int, seed: int = 0, resolution: int = RESOLUTION, unique: bool = False) -> Iterator[Example]:
    """The scenes of ``sample_scenes(n, seed)``, drawn one at a time and rendered when loaded. ``unique``: each
    caption gets a `` #i`` suffix (benchmarks that need every caption distinct). The stamp is a hash of the scene's
    parameters and the resolution (rendering is a pure function of them)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = random_scene(rng)
        caption = f"{scene.caption} #{i}" if unique else scene.caption
        stamp = hashlib.blake2b(f"{scene!r}|{resolution}".encode(), digest_size=8).hexdigest()
        yield Example((lambda s=scene: Image.fromarray(render(s, resolution))), caption, f"toy-{seed}-{i}", stamp)


def toy_examples(n: int, seed: int = 0, resolution: int = RESOLUTION) -> list[Example]:
    return list(iter_toy_examples(n, seed, resolution))


def _walk_images(directory: Path) -> Iterator[Path]:
    """The images under ``directory``, in sorted order, one directory listing in memory at a time."""
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(root) / name


def image_folder_examples(directory: Path, caption_column: str = "text") -> Iterator[Example]:
    meta = directory / "metadata.jsonl"
    if meta.exists():
        yield from _metadata_examples(directory, meta, caption_column)
        return
    total, missing = 0, []  # a first pass, so the error counts every image without a caption
    for p in _walk_images(directory):
        total += 1
        if not p.with_suffix(".txt").exists():
            missing.append(p.name)
    if not total:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {directory}")
    if missing:
        shown = ", ".join(missing[:5])
        raise DataError(f"{len(missing)} of {total} images in {directory} have no caption file "
                        f"(e.g. {shown}): write a .txt with the same name beside each image, or a "
                        f"metadata.jsonl with file_name/{caption_column} fields")
    for p in _walk_images(directory):
        caption_file = p.with_suffix(".txt")
        caption = read_text_file(caption_file).strip()
        if not caption:
            raise DataError(f"{caption_file} is empty; write the caption of {p.name} into it, or remove the image")
        yield Example(_open_image(p), caption, str(p.relative_to(directory)), file_stamp(p))


def _metadata_lines(meta: Path) -> Iterator[tuple[int, str]]:
    with open(meta, "rb") as f:
        for line_no, data in enumerate(f, 1):
            try:
                yield line_no, data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{meta}:{line_no}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
                                "UTF-8") from None


def _metadata_examples(directory: Path, meta: Path, caption_column: str) -> Iterator[Example]:
    count = 0
    for line_no, line in _metadata_lines(meta):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{meta}:{line_no}: not valid JSON ({e.msg}, column {e.colno}); fix or remove the line"
                            ) from None
        if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
            got = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{meta}:{line_no} needs 'file_name' and '{caption_column}' fields "
                            f"(set caption_column to the field holding captions); got {got}")
        caption = str(row[caption_column]).strip()
        if not caption:
            raise DataError(f"{meta}:{line_no}: empty '{caption_column}' for {row['file_name']}; write its caption "
                            "or remove the line")
        image = directory / row["file_name"]
        if not image.is_file():
            raise DataError(f"{meta}:{line_no}: image {row['file_name']} not found in {directory}; fix file_name "
                            "or remove the line")
        count += 1
        yield Example(_open_image(image), caption, row["file_name"], file_stamp(image))
    if not count:
        raise DataError(f"{meta} lists no images; add file_name/{caption_column} lines")


def hf_dataset_examples(directory: Path, caption_column: str, image_column: str) -> Iterator[Example]:
    try:
        import datasets  # optional: only for `save_to_disk` sources
    except ImportError as e:
        raise DataError(f"{directory} looks like a `datasets.save_to_disk` directory; pip install datasets") from e
    ds = datasets.load_from_disk(str(directory))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"]
    for col in (caption_column, image_column):
        if col not in ds.column_names:
            raise DataError(f"dataset at {directory} has no column {col!r}; columns: {ds.column_names} "
                            "(set caption_column / image_column)")
    stamp = ",".join(f"{p.relative_to(directory)}={file_stamp(p)}" for p in sorted(directory.rglob("*")) if p.is_file())
    stamp = hashlib.sha256(stamp.encode()).hexdigest()[:16]  # any change to the dataset's files
    i = 0
    for batch in ds.select_columns([caption_column]).iter(batch_size=1024):  # the caption column only
        for caption in batch[caption_column]:
            yield Example((lambda i=i: ds[i][image_column].convert("RGB")), str(caption), f"row-{i}", stamp)
            i += 1


def import_webdataset():
    try:
        import webdataset  # optional dependency: only WebDataset sources need it
    except ImportError:
        raise DataError("WebDataset shards need the webdataset package: pip install 'stepdistill[data]'") from None
    return webdataset


def is_webdataset(source: str) -> bool:
    return source.endswith(".tar") or "{" in source


def shard_urls(source: str) -> list[str]:
    """The shard URLs of a WebDataset spec: brace patterns expanded (``path/{00000..00099}.tar``), local glob
    patterns (``path/*.tar``) matched; DataError when there are none."""
    if glob.has_magic(source) and "://" not in source:
        urls = sorted(glob.glob(source))
    else:
        urls = list(import_webdataset().shardlists.expand_urls(source))
    if not urls:
        raise DataError(f"{source}: no WebDataset shards; give path/{{00000..00099}}.tar, path/*.tar or one .tar")
    return urls


def webdataset_sample(sample: dict, caption_key: str, where: str) -> tuple[bytes, str]:
    """``(image bytes, caption)`` of one WebDataset sample (its first png/jpg/jpeg/webp entry and ``caption_key``,
    decoded as UTF-8); DataError naming the sample (``where``: its shard) and the fix."""
    key = next((k for k in ("png", "jpg", "jpeg", "webp") if k in sample), None)
    if key is None or caption_key not in sample:
        raise DataError(f"WebDataset sample {sample.get('__key__')} ({where}) needs an image (png/jpg/webp) and a "
                        f"'{caption_key}' entry")
    caption = sample[caption_key]
    try:
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
    except UnicodeDecodeError as e:
        raise DataError(f"WebDataset sample {sample.get('__key__')} ({where}): caption is not UTF-8 ({e.reason} at "
                        f"byte {e.start}); re-encode it as UTF-8") from None
    return sample[key], caption


def open_image_bytes(data: bytes):
    """A loader of an encoded image held in memory (RGB on load)."""
    return lambda: Image.open(io.BytesIO(data)).convert("RGB")


def webdataset_examples(pattern: str, caption_column: str = "txt") -> Iterator[Example]:
    wds = import_webdataset()
    for sample in wds.WebDataset(shard_urls(pattern), shardshuffle=False):  # one sample in memory at a time
        data, caption = webdataset_sample(sample, caption_column, sample.get("__url__", pattern))
        yield Example(open_image_bytes(data), caption, sample["__key__"], hashlib.sha256(data).hexdigest()[:16])


def load_examples(source: str, caption_column: str = "text", image_column: str = "image") -> list[Example]:
    """:func:`iter_examples` as a list (small sources and tests; the latent cache streams instead)."""
    return list(iter_examples(source, caption_column, image_column))


def iter_examples(source: str, caption_column: str = "text", image_column: str = "image") -> Iterator[Example]:
    """``source``: ``toy:N``, ``toy:N:SEED`` or ``toy:N:SEED:unique`` (captions made distinct, for benchmarks), a
    directory (image folder, imagefolder with metadata.jsonl, or a ``save_to_disk`` dataset), or WebDataset shards
    (``path/{00000..00009}.tar``, ``path/*.tar`` or a single ``.tar``). Problems with the spec itself are raised at once."""
    if source.startswith("toy:"):
        parts = source.split(":")
        try:
            n, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 0
        except ValueError:
            raise DataError(f"training data {source!r}: expected toy:N or toy:N:SEED") from None
        if n < 1 or len(parts) > 4 or (len(parts) == 4 and parts[3] != "unique"):
            raise DataError(f"training data {source!r}: expected toy:N, toy:N:SEED or toy:N:SEED:unique with N >= 1")
        return iter_toy_examples(n, seed=seed, unique=len(parts) == 4)
    if is_webdataset(source):
        return webdataset_examples(source)
    path = Path(source)
    if not path.is_dir():
        raise DataError(f"training data {source!r} is neither 'toy:N', a directory, nor WebDataset .tar shards")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return hf_dataset_examples(path, caption_column, image_column)
    return image_folder_examples(path, caption_column)


def check_resolution(resolution: int, multiple: int):
    if resolution <= 0 or resolution % multiple:
        lower, upper = max(multiple, resolution // multiple * multiple), (resolution // multiple + 1) * multiple
        raise DataError(f"resolution {resolution} must be a positive multiple of {multiple} for this model "
                        f"(VAE downsampling x UNet levels); use {lower} or {upper}")


def preprocess(image, resolution: int) -> np.ndarray:
    """Resize the shorter side to ``resolution`` and centre-crop: float32 (3, R, R) in [-1, 1]."""
    w, h = image.size
    s = resolution / min(w, h)
    if s != 1:
        image = image.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5) - 1.0
