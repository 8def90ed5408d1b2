"""Training the dVAE: logit-Laplace likelihood, Gumbel-softmax relaxation, KL to a uniform prior.

Normalisation (as the paper's): the loss is the negative β-ELBO of one image divided by its
number of pixel-channels S·S·3, averaged over the real (mask=True) examples:

    loss = [ Σ_pixels,channels NLL  +  β · Σ_token positions KL(q || uniform) ] / (S·S·3)

so both `nll` and `kl` are logged in nats per pixel-channel. The NLL is the density of the
ε-mapped pixels x' = (1-2ε)x + ε (the map's constant Jacobian is left out), so it can be
negative. `kl_per_token` (nats per grid position, at most ln vocab_size) is logged too because it
is easier to read than the per-pixel-channel share.

`task.nll_scale_power` = p > 0 weights each pixel-channel's NLL by stop_gradient(b)^p (the
"β-NLL" of Seitzer et al., 2022; p = 0 is the paper's loss). With a learned scale b the gradient
on μ is sign(error)/b, so pixels the decoder cannot yet predict (objects' colours and edges)
get a large b and little gradient, and stay unpredicted: small CPU runs stall there. With p = 1
μ learns as under an L1 loss in logit space while b still converges to its likelihood optimum.
The logged `nll` is always the unweighted likelihood.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.models import dvae as dvae_model
from dalle_jax.models.dvae import DVAE, map_pixels, to_unit_float, unmap_pixels
from dalle_jax.tasks.task import Task

LOG_IMAGES_MAX = 8


# --- schedules ----------------------------------------------------------------------------

def half_cosine(start: float, end: float, steps: int) -> Callable[[jax.Array], jax.Array]:
    """start -> end along half a cosine over `steps`, then constant (start at step 0).

    For a decreasing schedule this equals optax.cosine_decay_schedule(start, steps, end/start);
    it is written out because the KL weight rises from 0, which optax's decay cannot express.
    """
    def schedule(step):
        progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
        return end + (start - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return schedule


def kl_weight_schedule(task_config) -> Callable[[jax.Array], jax.Array]:
    """0 -> kl_weight over kl_warmup_steps (the paper's rise), then, if the config says so,
    kl_weight -> kl_weight_end over the next kl_decay_steps: a late, weaker KL lets the
    encoder's posterior sharpen once the codebook is in use, so the codes the decoder learns
    from are the argmax codes it will be given."""
    warmup = task_config.kl_warmup_steps
    rise = half_cosine(0.0, task_config.kl_weight, warmup)
    end = task_config.get("kl_weight_end", None)
    if end is None:
        return rise
    fall = half_cosine(task_config.kl_weight, end, task_config.kl_decay_steps)
    return lambda step: jnp.where(step < warmup, rise(step), fall(step - warmup))


def temperature_schedule(task_config) -> Callable[[jax.Array], jax.Array]:
    return half_cosine(task_config.temperature_start, task_config.temperature_end,
                       task_config.temperature_steps)


# --- loss terms ---------------------------------------------------------------------------

def logit_laplace_nll(x_mapped: jax.Array, mu: jax.Array, log_b: jax.Array) -> jax.Array:
    """-ln f(x'|mu, b) elementwise, f = exp(-|logit(x') - mu| / b) / (2b·x'(1-x')).

    x' must lie in (0, 1), which the ε-map guarantees.
    """
    logit = jnp.log(x_mapped) - jnp.log1p(-x_mapped)
    return (jnp.log(2.0) + log_b + jnp.log(x_mapped) + jnp.log1p(-x_mapped)
            + jnp.abs(logit - mu) * jnp.exp(-log_b))


def scale_weighted(nll: jax.Array, log_b: jax.Array, power: float) -> jax.Array:
    """nll · stop_gradient(b)^power (β-NLL); the identity for power 0."""
    if power == 0:
        return nll
    return nll * jax.lax.stop_gradient(jnp.exp(power * log_b))


def kl_to_uniform(logits: jax.Array) -> jax.Array:
    """KL(softmax(logits) || uniform) in nats over the last axis: Σ q ln q + ln V."""
    log_q = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(log_q) * log_q, axis=-1) + math.log(logits.shape[-1])


def gumbel_softmax(logits: jax.Array, rng: jax.Array, temperature: jax.Array) -> jax.Array:
    noise = jax.random.gumbel(rng, logits.shape, jnp.float32)
    return jax.nn.softmax((logits + noise) / temperature, axis=-1)


def per_example_mean(x: jax.Array) -> jax.Array:
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def per_example_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def batch_mask(batch: dict) -> jax.Array:
    if "mask" in batch:
        return batch["mask"]
    return jnp.ones(batch["image"].shape[:1], bool)


# --- evaluation helpers -------------------------------------------------------------------

def psnr(mse: float | np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    return 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))


def perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of a histogram: the number of equally used codes it is worth."""
    p = np.asarray(counts, np.float64)
    p = p[p > 0] / p.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def to_uint8(images: jax.Array) -> jax.Array:
    return jnp.round(jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def image_grid(top: jax.Array, bottom: jax.Array) -> jax.Array:
    """Two rows of n images each (n, S, S, 3) -> one (2S, n·S, 3) image."""
    rows = [jnp.concatenate(list(row), axis=1) for row in (top, bottom)]
    return jnp.concatenate(rows, axis=0)


# --- the task -----------------------------------------------------------------------------

class DVAETask(Task):
    name = "dvae"

    def __init__(self, config):
        if config.model.image_size != config.data.image_size:
            raise ValueError(f"config.model.image_size={config.model.image_size} differs from "
                             f"config.data.image_size={config.data.image_size}")
        self.config = config
        self.eps = config.task.logit_laplace_eps
        self.nll_scale_power = config.task.nll_scale_power
        self.kl_weight = kl_weight_schedule(config.task)
        self.temperature = temperature_schedule(config.task)

    def build_model(self, rngs: nnx.Rngs) -> DVAE:
        return dvae_model.from_config(self.config, rngs)

    def loss(self, model: DVAE, batch: dict, rng: jax.Array, step: jax.Array):
        x = to_unit_float(batch["image"])
        mask = batch_mask(batch)
        beta, tau = self.kl_weight(step), self.temperature(step)

        logits = model.encoder_logits(x)
        mu, log_b = model.decode_logits(gumbel_softmax(logits, rng, tau))

        pixel_channels = math.prod(x.shape[1:])
        pixel_nll = logit_laplace_nll(map_pixels(x, self.eps), mu, log_b)
        nll = per_example_mean(pixel_nll)
        trained_nll = per_example_mean(scale_weighted(pixel_nll, log_b, self.nll_scale_power))
        kl_sum = per_example_sum(kl_to_uniform(logits))
        kl = kl_sum / pixel_channels
        loss = masked_mean(trained_nll + beta * kl, mask)

        # The reconstruction the loss sees (through the relaxed codes, not the argmax ones).
        recon = unmap_pixels(jax.nn.sigmoid(mu), self.eps)
        metrics = {
            "nll": masked_mean(nll, mask),
            "kl": masked_mean(kl, mask),
            "kl_per_token": masked_mean(kl_sum, mask) / math.prod(logits.shape[1:3]),
            "kl_weight": beta,
            "temperature": tau,
            "mse": masked_mean(per_example_mean(jnp.square(recon - x)), mask),
        }
        return loss, metrics

    def reconstruct(self, model: DVAE, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(tokens, images in [0, 1]) through the argmax codes: what the transformer will use."""
        tokens = model.encode(images)
        return tokens, model.decode(tokens)

    def eval_sums(self, model: DVAE, batch: dict) -> dict[str, jax.Array]:
        x = to_unit_float(batch["image"])
        mask = batch_mask(batch)
        weight = mask.astype(jnp.float32)
        tokens, recon = self.reconstruct(model, x)
        mse = per_example_mean(jnp.square(recon - x))
        example_psnr = 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))
        code_weight = jnp.broadcast_to(mask[:, None, None], tokens.shape).astype(jnp.int32)
        code_counts = jnp.zeros(model.vocab_size, jnp.int32).at[tokens.ravel()].add(
            code_weight.ravel())
        return {
            "mse": jnp.sum(mse * weight),
            "psnr": jnp.sum(example_psnr * weight),
            "count": jnp.sum(mask.astype(jnp.int32)),
            "code_counts": code_counts,
        }

    def summarize(self, sums: dict[str, np.ndarray]) -> dict[str, float]:
        count = max(float(sums["count"]), 1.0)
        counts = np.asarray(sums["code_counts"])
        mse = float(sums["mse"]) / count
        return {
            "mse": mse,
            "psnr": float(psnr(mse)),  # of the mean MSE
            "mean_example_psnr": float(sums["psnr"]) / count,
            "codebook_perplexity": perplexity(counts) if counts.sum() else 0.0,
            "codes_used": float(np.mean(counts > 0)),
        }

    def log_images(self, model: DVAE, batch: dict) -> jax.Array:
        """Up to 8 originals (top row) above their argmax-token reconstructions (bottom row).

        The whole batch goes through the model before slicing: a slice of 8 would not divide
        over a larger batch-sharded mesh.
        """
        images = batch["image"]
        _, recon = self.reconstruct(model, images)
        n = min(LOG_IMAGES_MAX, images.shape[0])
        originals = to_uint8(to_unit_float(images[:n]))
        return image_grid(originals, to_uint8(recon[:n]))
