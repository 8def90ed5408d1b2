"""The small interface through which the one training loop trains every model.

A task owns a model family and what "training it" means: how to build it, its loss, its
evaluation and the images worth looking at. The loop owns everything else (mesh, sharding,
optimizer, checkpoints, logging), so the dVAE, the transformer and CLIP share it unchanged.

Batches are dicts of global arrays: 'image' uint8 (B, S, S, 3), 'text' int32 (B, L) and
'mask' bool (B,) (False marks padding rows of a short last evaluation batch).

A task that needs fixed inputs besides its own parameters (the transformer needs the trained
dVAE) defines `frozen_state() -> nnx.State`; the loop shards that state once, by its logical
axes, passes it to every step as an argument (never trained, never baked into the program as a
constant) and the task finds it in the batch under 'frozen'.

A task may also define `evaluate_model(model, tokenizer) -> dict[str, float]` for evaluations
that need the whole model on the host rather than sums over batches (CLIP's zero-shot
accuracy); the loop adds its figures to each evaluation's metrics (single-process runs only).
"""
from __future__ import annotations

from typing import Protocol

import jax
import numpy as np
from flax import nnx


class Task(Protocol):
    name: str

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A freshly initialised model whose parameters carry logical axis names.

        Called under `nnx.eval_shape` (to plan shardings) and inside a jit with sharded
        outputs (to create the parameters where they live), never eagerly on one device.
        """

    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The scalar training loss (mean over real examples) and scalar metrics to log.

        Traced inside the jit-compiled train step; `step` drives schedules such as the dVAE's
        temperature and KL weight.
        """

    def eval_sums(self, model: nnx.Module, batch: dict) -> dict[str, jax.Array]:
        """Sums over the batch's real (mask=True) examples, summed again over all batches.

        Must include 'count', the number of real examples.
        """

    def summarize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        """Evaluation metrics from the summed quantities (e.g. mean squared error -> PSNR)."""

    def log_images(self, model: nnx.Module, batch: dict) -> jax.Array:
        """A uint8 image grid (H, W, 3) worth looking at, e.g. originals beside reconstructions."""
