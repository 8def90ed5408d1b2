"""Writing drawn images to a directory: PNGs, grids and a JSON record (sample.py, pipeline).

    write_samples(out, prompts, images, seed=0, settings={...})              # n per prompt
    write_samples(out, prompts, result.images, seed=0, settings=..., reranked=result)

Files: `<prompt>_<image>.png` (3-digit indices; with reranking the image index is the rank,
best first), `grid_<prompt>.png`, with reranking `candidates_<prompt>.png` (every candidate in
drawing order), and `samples.json`: the prompts, seed, settings and, per image, the key it was
drawn with (`fold_in(key(seed), index)`) and, with reranking, every candidate's CLIP score and
rank.
"""
from __future__ import annotations

import json

import numpy as np

from dalle_jax import files


def to_pixels(images) -> np.ndarray:
    """Float images in [0, 1] -> uint8."""
    return (np.clip(np.asarray(images), 0, 1) * 255).round().astype(np.uint8)


def grid_of(images: np.ndarray, columns: int) -> np.ndarray:
    """(N, H, W, C) -> one image with `columns` per row (the last row padded with black)."""
    rows = [np.concatenate(list(images[i:i + columns]), axis=1)
            for i in range(0, len(images), columns)]
    rows[-1] = np.pad(rows[-1], ((0, 0), (0, rows[0].shape[1] - rows[-1].shape[1]), (0, 0)))
    return np.concatenate(rows, axis=0)


def _key(seed: int, index: int) -> str:
    return f"fold_in(key({seed}), {index})"


def write_samples(out: str, prompts: list[str], images, *, seed: int, settings: dict,
                  reranked=None, extra: dict | None = None) -> str:
    """Writes the images (prompt-major, the same number per prompt) and returns the path of
    samples.json. `reranked` is a `rerank.Reranked` whose kept images are `images`."""
    files.make_dirs(out)
    pixels = to_pixels(images)
    n = len(pixels) // len(prompts)
    for p in range(len(prompts)):
        mine = pixels[p * n:(p + 1) * n]
        for i, image in enumerate(mine):
            files.write_png(files.join(out, f"{p:03d}_{i:03d}.png"), image)
        files.write_png(files.join(out, f"grid_{p:03d}.png"), grid_of(mine, min(n, 8)))
    record = {"prompts": list(prompts), "n": n, "seed": seed, "settings": settings,
              **(extra or {})}
    if reranked is None:
        record["images"] = [{"prompt": p, "index": i, "key": _key(seed, i),
                             "file": f"{p:03d}_{i:03d}.png"}
                            for p in range(len(prompts)) for i in range(n)]
    else:
        record["images"] = [{"prompt": p, "rank": r, "index": int(i), "key": _key(seed, int(i)),
                             "score": float(reranked.scores[p, i]),
                             "file": f"{p:03d}_{r:03d}.png"}
                            for p in range(len(prompts)) for r, i in enumerate(reranked.kept[p])]
        record["candidates"] = _write_candidates(out, prompts, reranked, seed)
    path = files.join(out, "samples.json")
    files.write_text(path, json.dumps(record, indent=1))
    return path


def _write_candidates(out: str, prompts: list[str], reranked, seed: int) -> list[dict]:
    count = reranked.scores.shape[1]
    pixels = to_pixels(reranked.candidates)
    records = []
    for p in range(len(prompts)):
        files.write_png(files.join(out, f"candidates_{p:03d}.png"),
                        grid_of(pixels[p * count:(p + 1) * count], min(count, 8)))
        rank_of = {int(i): r for r, i in enumerate(reranked.kept[p])}
        records += [{"prompt": p, "index": i, "key": _key(seed, i),
                     "score": float(reranked.scores[p, i]), "kept_rank": rank_of.get(i)}
                    for i in range(count)]
    return records
