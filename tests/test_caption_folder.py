"""End-to-end tests of the `caption_folder` TFDS builder on folders made in tmp_path."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dalle_jax.data import caption_folder as cf

# JPEG at quality 95 (twice for JPEG sources): smooth test images stay within a few
# levels on average, while a wrong conversion (alpha on black, clipped 16-bit, no EXIF
# rotation, naive CMYK) is off by tens to hundreds.
MEAN_TOL = 3.0


# --------------------------------------------------------------------------- helpers


def gradient(h: int, w: int) -> np.ndarray:
    """Smooth RGB content (JPEG-friendly) that is different along each axis."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                     np.full_like(x, 90)], axis=-1).astype(np.uint8)


@contextlib.contextmanager
def absl_records():
    """Collects absl log messages (INFO and up) emitted inside the block."""
    records: list[logging.LogRecord] = []

    class _Handler(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("absl")
    handler, old_level = _Handler(level=logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def build(folder, data_dir, max_side=512):
    builder = tfds.builder("caption_folder", config=cf.make_config(folder, max_side),
                           data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return builder


def read_split(builder, split="train") -> list[dict]:
    src = builder.as_data_source(split)
    out = []
    for i in range(len(src)):
        ex = src[i]
        out.append({"image": ex["image"], "caption": ex["caption"].decode(),
                    "file": ex["file"].decode()})
    return out


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


# ----------------------------------------------------------------- the messy jsonl folder


def make_messy_folder(root):
    """Every kind of input the builder must handle; returns {file: expected RGB}."""
    root.mkdir()
    (root / "sub").mkdir()
    expected = {}

    rgb = gradient(32, 48)
    Image.fromarray(rgb).save(root / "rgb.jpg", quality=95)
    expected["rgb.jpg"] = np.asarray(Image.open(root / "rgb.jpg").convert("RGB"))

    png = gradient(20, 30)[:, ::-1]
    Image.fromarray(png).save(root / "sub" / "pic.png")
    expected["sub/pic.png"] = png

    Image.fromarray(gradient(24, 24)).save(root / "UPPER.JPG", quality=95)
    expected["UPPER.JPG"] = np.asarray(Image.open(root / "UPPER.JPG").convert("RGB"))

    Image.fromarray(gradient(16, 40)).save(root / "photo.webp", lossless=True)
    expected["photo.webp"] = gradient(16, 40)

    gray = gradient(20, 28)[..., 0]
    Image.fromarray(gray, "L").save(root / "gray.png")
    expected["gray.png"] = np.repeat(gray[..., None], 3, axis=-1)

    g16 = (np.linspace(0, 65535, 26 * 18).reshape(18, 26)).astype(np.uint16)
    Image.fromarray(g16).save(root / "gray16.png")
    assert Image.open(root / "gray16.png").mode.startswith("I")
    g8 = np.rint(g16 / 257.0).astype(np.uint8)
    expected["gray16.png"] = np.repeat(g8[..., None], 3, axis=-1)

    bits = (np.indices((24, 32)).sum(0) // 8 % 2).astype(bool)  # 8x8 checker blocks
    Image.fromarray(bits).convert("1").save(root / "bw.bmp")
    expected["bw.bmp"] = np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, -1)

    color = gradient(20, 36)
    alpha = np.tile(np.linspace(0, 255, 36), (20, 1)).astype(np.uint8)
    Image.fromarray(np.dstack([color, alpha]), "RGBA").save(root / "rgba.png")
    a = alpha[..., None] / 255.0
    expected["rgba.png"] = np.rint(color * a + 255 * (1 - a)).astype(np.uint8)  # on white

    palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [240, 240, 240]],
                       np.uint8)
    idx = (np.indices((24, 32))[1] // 8).astype(np.uint8)  # four vertical bands
    pimg = Image.fromarray(idx, "P")
    pimg.putpalette(palette.flatten().tolist())
    pimg.save(root / "palette.gif")
    expected["palette.gif"] = palette[idx]

    y, x = np.mgrid[0:20, 0:30]
    cmyk = np.stack([x * 6, y * 8, np.full_like(x, 40), np.full_like(x, 30)], -1).astype(np.uint8)
    Image.fromarray(cmyk, "CMYK").save(root / "cmyk.jpg", quality=95)
    assert Image.open(root / "cmyk.jpg").mode == "CMYK"
    k = cmyk[..., 3:].astype(np.float64)
    expected["cmyk.jpg"] = np.rint((255 - k) * (255 - cmyk[..., :3]) / 255).astype(np.uint8)

    # Stored 40 wide x 20 high with EXIF orientation 6 = "rotate 90 degrees clockwise".
    upright = gradient(20, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(upright).save(root / "exif.jpg", quality=95, exif=exif)
    expected["exif.jpg"] = np.rot90(upright, k=-1)

    # Skipped inputs.
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(root / "trunc.jpg")
    data = (root / "trunc.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError):  # precondition: PIL really cannot decode it
        Image.open(root / "trunc.jpg").load()
    (root / "zero.jpg").write_bytes(b"")
    (root / "text.png").write_text("this is not a png at all\n")
    Image.fromarray(gradient(8, 8)).save(root / "empty_cap.png")
    Image.fromarray(gradient(8, 8)).save(root / "nocap.jpg")
    (root / "notes.md").write_text("not an image, ignored")

    write_jsonl(root / "captions.jsonl", [
        {"file": "rgb.jpg", "caption": "  a   red\tgradient \n "},
        {"file": "rgb.jpg", "caption": "second caption"},
        {"file": "sub/pic.png", "caption": "a png in a subfolder"},
        {"file": "UPPER.JPG", "caption": "upper case extension"},
        "{this is not json",
        {"file": "photo.webp", "caption": "webp"},
        {"file": "gray.png", "caption": "gray"},
        {"file": "gray16.png", "caption": "sixteen bit"},
        {"file": "bw.bmp", "caption": "one bit"},
        {"file": "rgba.png", "caption": "transparent"},
        {"file": "palette.gif", "caption": "palette"},
        {"file": "cmyk.jpg", "caption": "cmyk"},
        {"file": "exif.jpg", "caption": "rotated"},
        {"file": "trunc.jpg", "caption": "truncated"},
        {"file": "zero.jpg", "caption": "zero bytes"},
        {"file": "text.png", "caption": "text renamed"},
        {"file": "empty_cap.png", "caption": " \t "},
        {"file": "ghost.jpg", "caption": "does not exist"},
        "",  # blank line: ignored, not malformed
    ])
    return expected


EXPECTED_PAIRS = {
    ("rgb.jpg", "a red gradient"), ("rgb.jpg", "second caption"),
    ("sub/pic.png", "a png in a subfolder"), ("UPPER.JPG", "upper case extension"),
    ("photo.webp", "webp"), ("gray.png", "gray"), ("gray16.png", "sixteen bit"),
    ("bw.bmp", "one bit"), ("rgba.png", "transparent"), ("palette.gif", "palette"),
    ("cmyk.jpg", "cmyk"), ("exif.jpg", "rotated"),
}


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    expected = make_messy_folder(root / "photos")
    with absl_records() as records:
        builder = build(root / "photos", root / "data")
    return builder, read_split(builder), expected, records


def test_import_registers_builder():
    assert tfds.builder_cls("caption_folder") is cf.CaptionFolder


def test_jsonl_folder_has_exactly_the_valid_pairs(messy):
    builder, examples, _, _ = messy
    pairs = [(e["file"], e["caption"]) for e in examples]
    assert len(pairs) == len(set(pairs))
    assert set(pairs) == EXPECTED_PAIRS
    assert list(builder.info.splits.keys()) == ["train"]
    assert builder.info.splits["train"].num_examples == len(EXPECTED_PAIRS)


def test_images_are_rgb_uint8_with_source_content(messy):
    _, examples, expected, _ = messy
    for ex in examples:
        img, want = ex["image"], expected[ex["file"]]
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, ex["file"]
        assert img.shape == want.shape, ex["file"]
        err = np.abs(img.astype(np.float64) - want).mean()
        assert err < MEAN_TOL, f"{ex['file']}: mean abs error {err:.1f}"


def test_two_captions_share_one_image(messy):
    _, examples, _, _ = messy
    rgb = [e["image"] for e in examples if e["file"] == "rgb.jpg"]
    assert len(rgb) == 2 and np.array_equal(rgb[0], rgb[1])


def test_summary_and_warnings_are_logged(messy):
    _, _, _, records = messy
    messages = [r.getMessage() for r in records]
    summaries = [m for m in messages if m.startswith("caption_folder[train]: ")
                 and "examples;" in m]
    assert summaries == [
        "caption_folder[train]: 12 examples; skipped: 3 corrupt images, 1 empty caption, "
        "1 missing file, 1 uncaptioned image, 1 malformed caption line"]
    warnings = [r.getMessage() for r in records if r.levelno == logging.WARNING
                and r.getMessage().startswith("caption_folder[train]: skipped")]
    assert len(warnings) == 7
    for reason, needle in [("corrupt image", "trunc.jpg"), ("corrupt image", "zero.jpg"),
                           ("corrupt image", "text.png"), ("empty caption", "empty_cap.png"),
                           ("missing file", "ghost.jpg"), ("uncaptioned image", "nocap.jpg"),
                           ("malformed caption line", "captions.jsonl line 5")]:
        assert any(reason in w and needle in w for w in warnings), (reason, needle)


def test_build_is_deterministic(messy, tmp_path):
    builder, examples, _, _ = messy
    folder = builder.builder_config.folder
    again = read_split(build(folder, tmp_path / "data2"))
    assert [(e["file"], e["caption"]) for e in again] == \
        [(e["file"], e["caption"]) for e in examples]


def test_source_works_with_grain(messy):
    import grain

    builder, examples, _, _ = messy
    ds = grain.MapDataset.source(builder.as_data_source("train"))
    assert len(ds) == len(examples)
    assert ds[3]["file"].decode() == examples[3]["file"]


# -------------------------------------------------------------------- other sources


def test_csv_captions_with_quoted_comma(tmp_path):
    folder = tmp_path / "csvset"
    folder.mkdir()
    Image.fromarray(gradient(10, 12)).save(folder / "a.png")
    Image.fromarray(gradient(12, 10)).save(folder / "b.png")
    with open(folder / "captions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "caption"])
        w.writerow(["a.png", "red, green and blue"])
        w.writerow(["b.png", "spans\ntwo lines"])
        w.writerow(["a.png"])  # too few columns -> malformed; line 5 (row above has 2)
        w.writerow(["missing.png", "nope"])
    with absl_records() as records:
        examples = read_split(build(folder, tmp_path / "data"))
    assert sorted((e["file"], e["caption"]) for e in examples) == [
        ("a.png", "red, green and blue"), ("b.png", "spans two lines")]
    messages = [r.getMessage() for r in records]
    assert any("1 missing file" in m and "1 malformed caption line" in m and "2 examples" in m
               for m in messages)
    assert any("captions.csv line 5" in m for m in messages)


def test_sidecar_txt_captions(tmp_path):
    folder = tmp_path / "side"
    (folder / "deep").mkdir(parents=True)
    Image.fromarray(gradient(10, 12)).save(folder / "cat.jpg")
    (folder / "cat.txt").write_text("  a cat\n\non a mat \n")
    Image.fromarray(gradient(10, 12)).save(folder / "deep" / "dog.png")
    (folder / "deep" / "dog.txt").write_text("a dog")
    Image.fromarray(gradient(10, 12)).save(folder / "bird.png")  # no sidecar
    examples = read_split(build(folder, tmp_path / "data"))
    assert sorted((e["file"], e["caption"]) for e in examples) == [
        ("cat.jpg", "a cat on a mat"), ("deep/dog.png", "a dog")]


def test_train_and_validation_subfolders_are_splits(tmp_path):
    folder = tmp_path / "splits"
    for split, names in [("train", ["t1.png", "t2.png"]), ("validation", ["v1.png"])]:
        (folder / split).mkdir(parents=True)
        for name in names:
            Image.fromarray(gradient(8, 8)).save(folder / split / name)
        write_jsonl(folder / split / "captions.jsonl",
                    [{"file": n, "caption": f"{split} {n}"} for n in names])
    Image.fromarray(gradient(8, 8)).save(folder / "stray.png")  # ignored in split mode
    with absl_records() as records:
        builder = build(folder, tmp_path / "data")
    assert set(builder.info.splits.keys()) == {"train", "validation"}
    assert sorted((e["file"], e["caption"]) for e in read_split(builder, "train")) == [
        ("train/t1.png", "train t1.png"), ("train/t2.png", "train t2.png")]
    assert [(e["file"], e["caption"]) for e in read_split(builder, "validation")] == [
        ("validation/v1.png", "validation v1.png")]
    messages = [r.getMessage() for r in records]
    assert any(m.startswith("caption_folder[validation]: 1 example;") for m in messages)
    assert any("ignoring" in m and "stray.png" in m for m in messages)

    # Prepared data stays readable where the source folder is gone (e.g. a training VM).
    folder.rename(tmp_path / "moved")
    again = tfds.builder("caption_folder", config=cf.make_config(folder),
                         data_dir=tmp_path / "data")
    again.download_and_prepare(file_format="array_record")  # no-op: already prepared
    assert len(again.as_data_source("validation")) == 1


def test_max_side_downscales_keeping_aspect(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    wide = np.zeros((120, 300, 3), np.uint8)
    wide[:, :150] = (220, 20, 20)
    wide[:, 150:] = (20, 20, 220)
    Image.fromarray(wide).save(folder / "wide.png")
    Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2))).save(folder / "tall.jpg",
                                                                          quality=95)
    Image.fromarray(gradient(40, 50)).save(folder / "small.png")
    write_jsonl(folder / "captions.jsonl",
                [{"file": n, "caption": n} for n in ("wide.png", "tall.jpg", "small.png")])

    shapes = {e["file"]: e for e in read_split(build(folder, tmp_path / "d60", max_side=60))}
    assert shapes["wide.png"]["image"].shape == (60, 150, 3)
    assert shapes["tall.jpg"]["image"].shape == (150, 60, 3)  # JPEG draft path
    assert shapes["small.png"]["image"].shape == (40, 50, 3)  # never upscaled
    img = shapes["wide.png"]["image"].astype(int)
    assert np.abs(img[:, :70] - (220, 20, 20)).mean() < 6  # left half still red
    assert np.abs(img[:, 80:] - (20, 20, 220)).mean() < 6

    full = {e["file"]: e for e in read_split(build(folder, tmp_path / "d0", max_side=0))}
    assert full["wide.png"]["image"].shape == (120, 300, 3)


# ----------------------------------------------------------------------------- errors


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope"
    # make_config accepts it (prepared data may be read where the source is absent) ...
    configs = [cf.make_config(missing), cf.CaptionFolderConfig(name="x", folder=str(missing))]
    for config in configs:
        builder = tfds.builder("caption_folder", config=config, data_dir=tmp_path / "data")
        # ... but preparing fails with the folder named, before TFDS creates anything.
        with pytest.raises(ValueError, match=re.escape(str(missing))) as err:
            builder.download_and_prepare(file_format="array_record")
        assert "\n" not in str(err.value)
        assert not (tmp_path / "data").exists()


def test_folder_without_captions_is_a_clear_error(tmp_path):
    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    Image.fromarray(gradient(8, 8)).save(folder / "a.png")
    with pytest.raises(ValueError, match=re.escape(str(folder))) as err:
        build(folder, tmp_path / "data")
    assert "\n" not in str(err.value)


def test_all_images_corrupt_is_a_clear_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"")
    (folder / "b.png").write_text("not an image")
    write_jsonl(folder / "captions.jsonl",
                [{"file": "a.jpg", "caption": "a"}, {"file": "b.png", "caption": "b"}])
    builder = tfds.builder("caption_folder", config=cf.make_config(folder),
                           data_dir=tmp_path / "data")
    with pytest.raises(ValueError, match=re.escape(str(folder))) as err:
        builder.download_and_prepare(file_format="array_record")
    assert "2 corrupt images" in str(err.value) and "\n" not in str(err.value)
    assert not builder.data_path.exists()  # nothing half-written is left as "prepared"


@pytest.mark.parametrize("files", [
    {"captions.csv": "name,text\na.png,hello\n"},  # wrong header
    {"captions.csv": "file,caption\n", "captions.jsonl": ""},  # two sources
])
def test_bad_caption_sources_are_clear_errors(tmp_path, files):
    folder = tmp_path / "bad"
    folder.mkdir()
    Image.fromarray(gradient(8, 8)).save(folder / "a.png")
    for name, text in files.items():
        (folder / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(folder))) as err:
        build(folder, tmp_path / "data")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data" / "caption_folder" / cf.make_config(folder).name / "1.0.0"
                ).exists()


def test_builder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="make_config"):
        tfds.builder("caption_folder", data_dir=tmp_path).download_and_prepare()


# ------------------------------------------------------------------ config and helpers


def test_make_config_names_are_stable_and_distinct(tmp_path):
    a, b = tmp_path / "x" / "My Photos", tmp_path / "y" / "My Photos"
    a.mkdir(parents=True)
    b.mkdir(parents=True)
    ca = cf.make_config(a)
    assert ca.folder == str(a) and ca.max_side == 512
    assert re.fullmatch(r"my_photos_[0-9a-f]{10}", ca.name)
    assert cf.make_config(str(a)).name == ca.name
    assert cf.make_config(a, max_side=256).name != ca.name
    assert cf.make_config(b).name != ca.name
    for bad in (-1, 1.5, True, "512"):
        with pytest.raises(ValueError, match="max_side"):
            cf.make_config(a, max_side=bad)
    with pytest.raises(ValueError, match="folder"):
        cf.make_config("")


def test_read_jsonl_reports_line_numbers(tmp_path):
    path = tmp_path / "captions.jsonl"
    write_jsonl(path, [{"file": "./a/b.jpg", "caption": " x  y "}, "[1, 2]", "",
                       {"file": "c.jpg", "caption": 3}, "{oops"])
    rows, bad = cf.read_jsonl_captions(path)
    assert [(r.file, r.caption) for r in rows] == [("a/b.jpg", "x y")]
    assert [n for n, _ in bad] == [2, 4, 5]


def test_to_rgb_modes():
    la = Image.fromarray(np.dstack([np.full((2, 2), 0, np.uint8),
                                    np.array([[0, 255], [255, 0]], np.uint8)]), "LA")
    assert np.asarray(cf.to_rgb(la))[..., 0].tolist() == [[255, 0], [0, 255]]
    i16 = Image.fromarray(np.array([[0, 65535]], np.uint16))
    assert np.asarray(cf.to_rgb(i16))[0].tolist() == [[0, 0, 0], [255, 255, 255]]
    p = Image.new("P", (1, 2))
    p.putpalette([10, 20, 30, 40, 50, 60])
    p.putpixel((0, 1), 1)
    p.info["transparency"] = 1
    assert np.asarray(cf.to_rgb(p)).tolist() == [[[10, 20, 30]], [[255, 255, 255]]]


def test_load_image_reports_reason_instead_of_raising(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8garbage")
    img, reason = cf.load_image(tmp_path / "x.jpg", 512)
    assert img is None and reason
    img, reason = cf.load_image(tmp_path / "missing.jpg", 512)
    assert img is None and "FileNotFoundError" in reason
