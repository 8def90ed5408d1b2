"""`caption_folder`: a TFDS builder for a user's own folder of captioned images.

Usage::

    import tensorflow_datasets as tfds
    from dalle_jax.data.caption_folder import make_config  # registers the builder

    b = tfds.builder("caption_folder", config=make_config("/data/pets"), data_dir=DIR)
    b.download_and_prepare(file_format="array_record")  # random access for Grain
    src = b.as_data_source("train")
    src[0]  # {'image': uint8 HxWx3, 'caption': bytes, 'file': bytes}

Folder layout: images (jpg, jpeg, png, webp, bmp, gif; any case; subfolders searched
recursively, hidden files and folders ignored) captioned by exactly one of
``captions.jsonl`` ({"file": "rel/path.jpg", "caption": "..."} per line),
``captions.csv`` (header ``file,caption``) or a sidecar ``.txt`` per image
(``cat.jpg`` + ``cat.txt``). Subfolders named ``train`` / ``validation`` / ``test``
make one split each (captions paths are relative to the split folder); otherwise the
whole folder is ``train``. Every (image, caption) pair is one example; ``file`` is the
image path relative to the top folder.

Prepared data is a snapshot: the config name hashes the folder path and ``max_side``,
not the folder contents. After editing the folder, rebuild with
``download_config=tfds.download.DownloadConfig(
download_mode=tfds.GenerateMode.REUSE_CACHE_IF_EXISTS)``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils.epath import Path
from PIL import Image, ImageOps

from dalle_jax import files

__all__ = [
    "IMAGE_EXTENSIONS",
    "CaptionFolder",
    "CaptionFolderConfig",
    "find_splits",
    "list_images",
    "load_image",
    "make_config",
    "normalize_caption",
    "read_csv_captions",
    "read_jsonl_captions",
    "read_sidecar_captions",
    "to_rgb",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
SPLIT_NAMES = ("train", "validation", "test")
JSONL_NAME = "captions.jsonl"
CSV_NAME = "captions.csv"

# JPEG quality 95 with full-resolution chroma (4:4:4): the dVAE learns to reconstruct
# these pixels, so quality-75 block artefacts (PIL's default, which TFDS applies to PIL
# inputs) and 4:2:0 colour bleeding at sharp coloured edges (illustrations, logos, text:
# common in caption data) would become training targets. With the shorter side capped
# at max_side the extra bytes are modest (~40% over 4:2:0 on photos).
JPEG_QUALITY = 95
JPEG_SUBSAMPLING = 0  # PIL: 0 = 4:4:4
# Transparent pixels become white: transparent images in caption data are mostly logos,
# icons, clip art and product cut-outs drawn for white web pages; on black their (often
# dark) line art and text would vanish.
ALPHA_BACKGROUND = (255, 255, 255)

# Skip reasons, in the order the summary line lists them.
CORRUPT = "corrupt image"
EMPTY = "empty caption"
MISSING = "missing file"
UNCAPTIONED = "uncaptioned image"
MALFORMED = "malformed caption line"
SKIP_REASONS = (CORRUPT, EMPTY, MISSING, UNCAPTIONED, MALFORMED)


@dataclasses.dataclass(frozen=True)
class CaptionRow:
    """One caption as read from a source; `file` is relative to the split folder."""

    file: str
    caption: str  # already whitespace-normalised; may be "" (counted as empty later)
    where: str  # "captions.jsonl:12" or "cat.txt", for warnings


# ------------------------------------------------------------------------ pure helpers


def normalize_caption(text: str) -> str:
    """Collapses every whitespace run (newlines, tabs, NBSP) to one space and strips."""
    return " ".join(text.split())


def _normalize_relpath(name: str) -> str:
    # Caption files written on Windows or by hand use "\" and "./"; normpath makes
    # "a/./b.jpg" and "a/b.jpg" name the same image.
    return posixpath.normpath(name.strip().replace("\\", "/"))


def _read_text(path: Path) -> str:
    """Reads UTF-8 (BOM tolerated); bad bytes become U+FFFD with a warning, not a crash."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        logging.warning("caption_folder: %s is not valid UTF-8 (%s); bad bytes replaced", path, e)
        return data.decode("utf-8-sig", errors="replace")


def read_jsonl_captions(path: Path) -> tuple[list[CaptionRow], list[tuple[int, str]]]:
    """Returns (rows, malformed) where malformed lists (1-based line number, reason)."""
    rows, bad = [], []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (e.g. a trailing newline) are not errors
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append((lineno, f"invalid JSON ({e.msg})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("file"), str):
            bad.append((lineno, 'no string "file" field'))
        elif not isinstance(obj.get("caption"), str):
            bad.append((lineno, 'no string "caption" field'))
        else:
            rows.append(CaptionRow(_normalize_relpath(obj["file"]),
                                   normalize_caption(obj["caption"]), f"{path.name}:{lineno}"))
    return rows, bad


def read_csv_captions(path: Path) -> tuple[list[CaptionRow], list[tuple[int, str]]]:
    """Like `read_jsonl_captions`; line numbers are where each record starts.

    Raises ValueError if the header lacks `file` or `caption`: without it no row can be
    interpreted, and this runs before anything is written.
    """
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "file" not in fields or "caption" not in fields:
        raise ValueError(f"caption_folder: {path} needs a header row with columns file,caption "
                         f"(found {reader.fieldnames})")
    reader.fieldnames = fields  # tolerate " File , Caption " headers
    rows, bad = [], []
    start = reader.line_num + 1
    for record in reader:
        file, caption = record.get("file"), record.get("caption")
        if file is None or caption is None or not file.strip():
            bad.append((start, "missing file or caption column"))
        else:
            rows.append(CaptionRow(_normalize_relpath(file), normalize_caption(caption),
                                   f"{path.name}:{start}"))
        start = reader.line_num + 1  # quoted captions may span several physical lines
    return rows, bad


def read_sidecar_captions(images: dict[str, Path]) -> list[CaptionRow]:
    """One row per image that has a `<stem>.txt` next to it (whole file = caption)."""
    rows = []
    for rel, path in images.items():
        txt = path.with_suffix(".txt")
        if txt.is_file():
            rows.append(CaptionRow(rel, normalize_caption(_read_text(txt)), txt.name))
    return rows


def list_images(directory: Path) -> dict[str, Path]:
    """Maps posix paths relative to `directory` to image files, in sorted order.

    Hidden files and folders are skipped: they are OS/tool litter (.DS_Store,
    .ipynb_checkpoints, thumbnail caches), not training data. Symlinked folders are not
    followed so a link cycle cannot hang the build.
    """
    found = {}
    for dirpath, dirnames, filenames in Path(directory).walk():
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and _extension(name) in IMAGE_EXTENSIONS:
                path = Path(dirpath, name)
                rel = path.relative_to(directory)
                if not any(part.startswith(".") for part in rel.parts):
                    found[rel.as_posix()] = path
    return dict(sorted(found.items()))


def _extension(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


def find_splits(folder: Path) -> dict[str, Path]:
    """`train`/`validation`/`test` subfolders are splits; otherwise all of it is train."""
    splits = {s: folder / s for s in SPLIT_NAMES if (folder / s).is_dir()}
    return splits or {"train": folder}


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    # PIL's own I;16/I/F -> RGB conversion clips at 255, turning most of a 16-bit
    # image white; rescale the 16-bit range to 8 bits instead.
    a = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16") or a.max(initial=0) > 255:
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; alpha (incl. palette/tRNS transparency) composited on white."""
    if img.mode.startswith("I") or img.mode == "F":  # I, I;16, I;16B, ... and float
        img = _high_bit_depth_to_l(img)
    if img.mode == "P" or "transparency" in img.info:
        img = img.convert("RGBA")  # palette transparency is only usable as real alpha
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _shrink_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    w, h = size
    if max_side <= 0 or min(w, h) <= max_side:
        return size
    scale = max_side / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def load_image(path: Path, max_side: int) -> tuple[Image.Image | None, str | None]:
    """Returns (RGB image with shorter side <= max_side, None) or (None, skip reason).

    Never raises: a build over thousands of user files must not die on the one bad one.
    Animated GIF/WebP contribute their first frame.
    """
    try:
        with Path(path).open("rb") as f, Image.open(f) as img:
            if max_side > 0:
                # JPEG only: decode at 1/2..1/8 scale in the DCT (both sides stay
                # >= max_side), which makes big photos several times cheaper.
                img.draft("RGB", (max_side, max_side))
            img.load()  # Image.open is lazy; truncation only shows up here
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # broken EXIF should not cost us an otherwise good image
                oriented = img
            rgb = to_rgb(oriented)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        return None, f"{type(e).__name__}: {e}"
    target = _shrink_size(rgb.size, max_side)
    if target != rgb.size:
        # reducing_gap: box-reduce by an integer factor first, then LANCZOS the rest;
        # visually the same as pure LANCZOS and much faster on large inputs.
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return rgb, None


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)
    return buf.getvalue()


def _load_and_encode(path: Path, max_side: int) -> tuple[bytes | None, str | None]:
    img, reason = load_image(path, max_side)
    if img is None:
        return None, reason
    try:
        return _encode_jpeg(img), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


_DONE = object()


def _ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """`map` on a thread pool, in order, with at most 2*workers results in flight.

    PIL releases the GIL while decoding/resizing/encoding, so threads give real
    parallelism; the bounded window keeps memory flat on huge folders (Executor.map
    would submit everything up front).
    """
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        it = iter(items)
        # islice, not zip(it, range(n)): zip would pull one extra item from `it` and
        # drop it, shifting every later result onto the wrong input.
        window = collections.deque(pool.submit(fn, x) for x in itertools.islice(it, 2 * workers))
        while window:
            result = window.popleft().result()
            nxt = next(it, _DONE)
            if nxt is not _DONE:
                window.append(pool.submit(fn, nxt))
            yield result


# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(eq=False, kw_only=True)
class CaptionFolderConfig(tfds.core.BuilderConfig):
    """`folder`: the image folder; `max_side`: cap on the shorter side (0 = keep size).

    eq=False keeps BuilderConfig's identity equality and hashability.
    """

    folder: str
    max_side: int = 512


def _check_folder(folder: str) -> None:
    if not Path(folder).is_dir():
        raise ValueError(f"caption_folder: folder {folder!r} does not exist or is not a directory")


def make_config(folder: str | os.PathLike, max_side: int = 512) -> CaptionFolderConfig:
    """A config whose name (= data directory) is unique per absolute folder and max_side.

    The folder need not exist yet: data prepared on one machine can be read on another
    (e.g. a TPU VM) that does not have the source images. `download_and_prepare` checks
    that it exists before writing anything.
    """
    if not isinstance(folder, (str, os.PathLike)) or not os.fspath(folder):
        raise ValueError(f"caption_folder: folder must be a non-empty path, got {folder!r}")
    if isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 0:
        raise ValueError(f"caption_folder: max_side must be an int >= 0 (0 = keep size), "
                         f"got {max_side!r}")
    folder = os.fspath(folder)
    if not files.is_remote(folder):
        folder = os.path.expanduser(folder)
    abs_folder = files.absolute(folder)
    base = re.sub(r"[^a-z0-9]+", "_", posixpath.basename(abs_folder).lower()).strip("_")
    digest = hashlib.sha256(f"{abs_folder}\0{max_side}".encode()).hexdigest()[:10]
    return CaptionFolderConfig(
        name=f"{base[:40] or 'folder'}_{digest}",
        description=f"Captioned images from {abs_folder} (max_side={max_side}).",
        folder=abs_folder,
        max_side=max_side,
    )


# ----------------------------------------------------------------------------- builder


@dataclasses.dataclass
class _SplitPlan:
    """What to generate for one split, decided before any image is decoded."""

    name: str
    images: list[tuple[str, Path, list[str]]]  # (file rel. to top folder, path, captions)
    skips: collections.Counter


def _warn_skip(split: str, reason: str, what: str) -> None:
    logging.warning("caption_folder[%s]: skipped %s: %s", split, reason, what)


def _plan_split(split: str, split_dir: Path, folder: Path) -> _SplitPlan:
    images = list_images(split_dir)
    jsonl, csv_path = split_dir / JSONL_NAME, split_dir / CSV_NAME
    if jsonl.is_file() and csv_path.is_file():
        raise ValueError(f"caption_folder: {split_dir} has both {JSONL_NAME} and {CSV_NAME}; "
                         "keep one")
    skips: collections.Counter = collections.Counter()
    if jsonl.is_file() or csv_path.is_file():
        source = jsonl if jsonl.is_file() else csv_path
        reader = read_jsonl_captions if source is jsonl else read_csv_captions
        rows, bad = reader(source)
        for lineno, why in bad:
            skips[MALFORMED] += 1
            _warn_skip(split, MALFORMED, f"{source} line {lineno} ({why})")
    else:
        rows = read_sidecar_captions(images)
        if not rows:
            raise ValueError(f"caption_folder: {split_dir} has no captions source "
                             f"({JSONL_NAME}, {CSV_NAME} or <image>.txt sidecars)")

    captions: dict[str, list[str]] = collections.defaultdict(list)
    mentioned = set()
    for row in rows:
        if row.file not in images:
            why = "not a supported image" if (split_dir / row.file).is_file() else "no such file"
            skips[MISSING] += 1
            _warn_skip(split, MISSING, f"{split_dir / row.file} ({why}; {row.where})")
            continue
        mentioned.add(row.file)
        if not row.caption:
            skips[EMPTY] += 1
            _warn_skip(split, EMPTY, f"{images[row.file]} ({row.where})")
            continue
        captions[row.file].append(row.caption)

    planned = []
    for rel, path in images.items():
        if rel in captions:
            planned.append((path.relative_to(folder).as_posix(), path, captions[rel]))
        elif rel not in mentioned:  # an image whose only captions were empty is not
            skips[UNCAPTIONED] += 1  # counted twice
            _warn_skip(split, UNCAPTIONED, str(path))
    if not planned:
        raise ValueError(f"caption_folder: no captioned images in {split_dir} (split {split!r}; "
                         f"{_format_skips(skips)})")
    return _SplitPlan(split, planned, skips)


def _format_skips(skips: collections.Counter) -> str:
    return "skipped: " + ", ".join(
        f"{skips[r]} {r}{'' if skips[r] == 1 else 's'}" for r in SKIP_REASONS)


class CaptionFolder(tfds.core.GeneratorBasedBuilder):
    """Images + captions from a local folder; see the module docstring for the layout."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # No BUILDER_CONFIGS: every folder is a custom config from make_config().
    # MANUAL_DOWNLOAD_INSTRUCTIONS stays None: the data location travels in the config,
    # not in TFDS's manual_dir, and setting it would make TFDS tell users to place files
    # in ~/tensorflow_datasets/downloads/manual, which this builder never reads.

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Text-image pairs from a local folder of captioned images.",
            features=tfds.features.FeaturesDict({
                # Stored as JPEG bytes we encode ourselves (see JPEG_QUALITY).
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "caption": tfds.features.Text(),
                "file": tfds.features.Text(),
            }),
            supervised_keys=("image", "caption"),
        )

    def _config(self) -> CaptionFolderConfig:
        config = self.builder_config
        if not isinstance(config, CaptionFolderConfig):
            raise ValueError("caption_folder needs a config: "
                             "tfds.builder('caption_folder', config=make_config(folder))")
        return config

    def download_and_prepare(self, **kwargs):
        # Check the folder before TFDS creates data_dir/caption_folder/<config>/ for a
        # build that is bound to fail. Already prepared data stays loadable even if the
        # source folder has since gone away (TFDS returns early then).
        if not self.data_path.exists():
            _check_folder(self._config().folder)
        return super().download_and_prepare(**kwargs)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        config = self._config()
        folder = Path(config.folder)
        _check_folder(config.folder)
        splits = find_splits(folder)
        if folder not in splits.values():
            stray = [n for n in sorted(p.name for p in folder.iterdir())
                     if n in (JSONL_NAME, CSV_NAME) or _extension(n) in IMAGE_EXTENSIONS]
            if stray:
                logging.warning("caption_folder: %s has split subfolders (%s); ignoring its "
                                "top-level %s", folder, ", ".join(splits), ", ".join(stray))
        # Plan every split first so caption-level problems (no source, nothing captioned)
        # fail before a single example is written.
        plans = {name: _plan_split(name, d, folder) for name, d in splits.items()}
        return {name: self._generate_examples(plan) for name, plan in plans.items()}

    def _generate_examples(self, plan: _SplitPlan):
        max_side = self._config().max_side
        skips = collections.Counter(plan.skips)
        written = 0
        loaded = _ordered_map(lambda item: _load_and_encode(item[1], max_side), plan.images,
                              workers=min(8, os.cpu_count() or 1))
        for (rel, path, captions), (jpeg, reason) in zip(plan.images, loaded):
            if jpeg is None:
                skips[CORRUPT] += 1
                _warn_skip(plan.name, CORRUPT, f"{path} ({reason})")
                continue
            for i, caption in enumerate(captions):
                # Raw JPEG bytes pass through tfds.features.Image untouched; the key is
                # stable across rebuilds, so TFDS's hash-based shuffle order is too.
                yield f"{rel}#{i}", {"image": jpeg, "caption": caption, "file": rel}
                written += 1
        logging.info("caption_folder[%s]: %d example%s; %s", plan.name, written,
                     "" if written == 1 else "s", _format_skips(skips))
        if written == 0:
            raise ValueError(f"caption_folder: split {plan.name!r} of {self._config().folder} "
                             f"has no usable images ({_format_skips(skips)})")
