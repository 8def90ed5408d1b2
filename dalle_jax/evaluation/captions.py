"""Do sampled images show their captions? Judged from pixels, per setting and split.

For each caption and setting (plain sampling, classifier-free guidance at each scale),
`candidates` images are drawn; the setting's figures are over all of them, and its reranked
figures over the `keep` that CLIP scores highest among them (best of N from the very same
draws, so the two differ only by the choice), with the best-of-n curve over fewer candidates
from the same draws. Every image is read by `evaluation.judge`:
`match` (everything the caption says, nothing extra) and per attribute: colour, shape,
position (captions that state a cell), relation (captions that state one), count (no object
missing or extra).
"""
from __future__ import annotations

import numpy as np

from dalle_jax.evaluation import judge
from dalle_jax.sampling import rerank
from dalle_jax.sampling.outputs import to_pixels

ATTRIBUTES = ("match", "colour", "shape", "position", "relation", "count")


def judged_rates(images: np.ndarray, captions: list[str]) -> dict[str, float | int]:
    """Share of images for which each attribute holds, over the images where it applies;
    `images` float in [0, 1] or uint8, one caption per image."""
    return rates_of(verdicts_of(images, captions))


def verdicts_of(images: np.ndarray, captions: list[str]) -> list[dict]:
    return [judge.judge(image, caption)
            for image, caption in zip(to_pixels_if_float(images), captions)]


def rates_of(verdicts: list[dict]) -> dict[str, float | int]:
    rates: dict[str, float | int] = {"images": len(verdicts)}
    for attribute in ATTRIBUTES:
        applicable = [v[attribute] for v in verdicts if v[attribute] is not None]
        rates[attribute] = float(np.mean(applicable)) if applicable else float("nan")
    return rates


def to_pixels_if_float(images) -> np.ndarray:
    images = np.asarray(images)
    return images if images.dtype == np.uint8 else to_pixels(images)


def distinct_captions(captions, limit: int) -> list[str]:
    """The first `limit` different captions, in the split's order."""
    seen = list(dict.fromkeys(captions))
    return seen[:limit] if limit else seen


def best_of_curve(scores: np.ndarray, matches: np.ndarray, smallest: int = 8) -> dict[int, float]:
    """{n: the share of captions whose best-scoring draw among n matches}, for n = N, N/2, ...
    down to `smallest` (and N itself when N is smaller): (P, N) `scores` and `matches` of the
    same draws, best of n averaged over the N/n disjoint groups of n consecutive draws, so
    one set of draws shows what fewer candidates would have given."""
    scores, matches = np.asarray(scores), np.asarray(matches, bool)
    if scores.shape != matches.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and matches {matches.shape} must both be "
                         "(captions, candidates)")
    total = scores.shape[1]
    curve, n = {}, total
    while n == total or (n >= smallest and total % n == 0):
        groups = total // n
        best = scores.reshape(len(scores), groups, n).argmax(axis=2)
        picked = np.take_along_axis(matches.reshape(len(scores), groups, n), best[..., None], 2)
        curve[n] = float(picked.mean())
        if n % 2:
            break
        n //= 2
    return curve


def evaluate_captions(generate, captions: list[str], *, candidates: int, keep: int,
                      guidance_scales=(), seed: int = 0, on_rates=None, **sampling):
    """{setting name: rates} and {setting name: images (len(captions), k, S, S, 3)} for plain
    sampling and each guidance scale (over all `candidates` drawn per caption, with
    `any_match`: the share of captions with at least one matching candidate), and for the
    best `keep` of those candidates by CLIP (when the generator has a scorer). `sampling`:
    the generator's temperature, top_k, top_p, shared by every setting. `on_rates(name,
    rates)`, if given, is called as each setting's figures are ready (a run can take an hour)."""
    rates, images = {}, {}
    draws = [("plain", {})] + [(f"guidance {scale:g}", {"guidance": scale})
                               for scale in guidance_scales]
    for index, (name, controls) in enumerate(draws):
        drawn = generate(captions, candidates, seed + index, **sampling, **controls)
        size = drawn.shape[1:]
        verdicts = verdicts_of(drawn, list(np.repeat(captions, candidates)))
        rates[name] = rates_of(verdicts)
        # What a perfect reranker could reach: captions with a matching image among the draws.
        matches = np.array([v["match"] for v in verdicts]).reshape(len(captions), candidates)
        rates[name]["any_match"] = float(matches.any(axis=1).mean())
        images[name] = drawn.reshape(len(captions), candidates, *size)[:, :keep]
        if generate.scorer is not None:
            best = rerank.rerank(captions, drawn, generate.scorer, keep)
            reranked = f"{name}, best {keep} of {candidates} by CLIP"
            rates[reranked] = judged_rates(best.images, list(np.repeat(captions, keep)))
            rates[reranked]["best_of"] = best_of_curve(best.scores, matches)
            images[reranked] = best.images.reshape(len(captions), keep, *size)
        if on_rates is not None:
            for done in (name, f"{name}, best {keep} of {candidates} by CLIP"):
                if done in rates:
                    on_rates(done, rates[done])
    return rates, images
