"""Best-of-N sampling: draw N candidates per caption, keep the K that CLIP scores highest.

    generate = Generator.from_workdir("workdirs/dalle_mini", clip_workdir="workdirs/clip_mini")
    result = generate.best_of(["a red circle"], candidates=16, keep=2, seed=0)
    result.images        # (P·K, S, S, 3) the kept images, best first within each prompt
    result.scores        # (P, N) every candidate's CLIP score, in drawing order
    result.kept          # (P, K) the candidates' indices that were kept, best first

This is the paper's reranking (512 candidates, CLIP keeps the best 1..32): the transformer's
likelihood says what an image should look like token by token, CLIP judges the whole picture
against the caption.
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Reranked:
    images: np.ndarray  # (P·K, S, S, 3) float32 in [0, 1], prompt-major, best first
    scores: np.ndarray  # (P, N) every candidate's score
    kept: np.ndarray  # (P, K) kept candidate indices, best first
    candidates: np.ndarray  # (P·N, S, S, 3) every candidate, prompt-major, in drawing order


def top_k_indices(scores: np.ndarray, keep: int) -> np.ndarray:
    """(P, N) scores -> (P, keep) indices of each row's highest scores, best first; equal
    scores keep drawing order, so the result is deterministic."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (prompts, candidates), got shape {scores.shape}")
    if not 1 <= keep <= scores.shape[1]:
        raise ValueError(f"keep={keep} must be between 1 and the {scores.shape[1]} candidates")
    return np.argsort(-scores, axis=1, kind="stable")[:, :keep]


def rerank(prompts: list[str], candidates: np.ndarray, scorer, keep: int) -> Reranked:
    """Scores `candidates` (P·N images, prompt-major) against their prompts, keeps K each."""
    n = len(candidates) // len(prompts)
    if n * len(prompts) != len(candidates):
        raise ValueError(f"{len(candidates)} candidates do not divide among {len(prompts)} "
                         "prompts")
    scores = scorer.score(candidates, list(np.repeat(prompts, n))).reshape(len(prompts), n)
    kept = top_k_indices(scores, keep)
    rows = (np.arange(len(prompts))[:, None] * n + kept).reshape(-1)
    return Reranked(images=candidates[rows], scores=scores, kept=kept, candidates=candidates)
