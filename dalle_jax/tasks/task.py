"""The small interface through which the one training loop trains every model.

A task owns a model family and what "training it" means: how to build it, its loss, its
evaluation and the images worth looking at. The loop owns everything else (mesh, sharding,
optimizer, checkpoints, logging), so the dVAE, the transformer and CLIP share it unchanged.

Batches are dicts of global arrays: 'image' uint8 (B, S, S, 3), 'text' int32 (B, L) and
'mask' bool (B,) (False marks padding rows of a short last evaluation batch). A task is given
everything it needs when it is made (e.g. the transformer gets the trained dVAE); it reads
nothing from disk itself.

The first four methods are required; the others are optional hooks whose defaults mean "this
task has none", and the loop calls every one of them.
"""
from __future__ import annotations

import abc

import jax
import numpy as np
from flax import nnx


class Task(abc.ABC):
    name: str

    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """A freshly initialised model whose parameters carry logical axis names.

        Called under `nnx.eval_shape` (to plan shardings) and inside a jit with sharded
        outputs (to create the parameters where they live), never eagerly on one device.
        """

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: dict, rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The scalar training loss (mean over real examples) and scalar metrics to log.

        Traced inside the jit-compiled train step; `step` drives schedules such as the dVAE's
        temperature and KL weight.
        """

    @abc.abstractmethod
    def eval_sums(self, model: nnx.Module, batch: dict) -> dict[str, jax.Array]:
        """Sums over the batch's real (mask=True) examples, summed again over all batches.

        Must include 'count', the number of real examples.
        """

    @abc.abstractmethod
    def summarize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        """Evaluation metrics from the summed quantities (e.g. mean squared error -> PSNR)."""

    # --- optional hooks -----------------------------------------------------------------

    def log_images(self, model: nnx.Module, batch: dict) -> jax.Array | None:
        """A uint8 image grid (H, W, 3) worth looking at, e.g. originals beside
        reconstructions; None: no images."""
        return None

    def reads_training_images(self) -> bool:
        """Whether the train step reads its batches' images; False spares the input pipeline
        their decoding (the transformer with a token cache)."""
        return True

    def frozen_state(self) -> nnx.State | None:
        """Fixed inputs besides the task's own parameters (the transformer's dVAE), or None.

        The loop shards this state once, by its logical axes, and passes it to every step as
        an argument (never trained, never baked into the program as a constant); the task
        finds it in the batch under 'frozen'. An abstract state (ShapeDtypeStructs) is
        planned the same way (`dalle_jax.plan`).
        """
        return None

    def evaluate_model(self, model: nnx.Module, tokenizer) -> dict[str, float]:
        """Evaluations that need the whole model on the host rather than sums over batches
        (CLIP's zero-shot accuracy); the loop adds them to each evaluation's metrics
        (single-process runs only)."""
        return {}

    def flops_per_example(self) -> float | None:
        """Training FLOPs of one example by the model's formula; None: use XLA's count."""
        return None

    def tokens_per_example(self) -> int:
        """Positions one example trains on (the transformer's stream), for tokens/s figures."""
        return 1
