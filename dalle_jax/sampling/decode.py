"""Drawing image tokens from the DALL·E transformer: one prefill, then a device-side loop.

The caption is processed in one forward pass (`DALLE.prefill`), then image tokens are produced
one at a time by a `lax.fori_loop` over a preallocated key/value cache that every step updates in
place (`DALLE.decode_step`). All shapes are fixed by the model and the batch, and every sampling
control is a traced value, so one compilation serves every prompt, seed, temperature, top-k,
top-p and guidance scale; only switching guidance on or off (which doubles the streams) or the
cache-read implementation compiles a second program.

Every image has its own random key, folded with the position of each token, so an image
depends only on (caption, key), never on what else is in the batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dalle_jax.models.dalle import empty_captions


def guided_logits(logits: jax.Array, scale: jax.Array, batch: int) -> jax.Array:
    """Classifier-free guidance: uncond + scale·(cond − uncond), streams stacked [cond; uncond]."""
    cond, uncond = logits[:batch], logits[batch:]
    return uncond + scale * (cond - uncond)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits outside the top-k (k <= 0: no limit) and the top-p nucleus (p >= 1: none) -> -inf.

    k and p are traced, so changing them does not recompile: the cut-offs are read from the
    sorted logits instead of `lax.top_k`, whose k must be static. Without a cut the sort is
    skipped at run time: on a CPU it took longer than the rest of a small model's decode step.
    """
    no_cut = (top_k <= 0) & (top_p >= 1)
    return jax.lax.cond(no_cut, lambda x: x, lambda x: _cut_logits(x, top_k, top_p), logits)


def _cut_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, jnp.broadcast_to(k - 1, logits.shape[:-1])[..., None],
                              axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    # Keep a token while the mass before it is below p: the first token always stays.
    before = jnp.cumsum(probs, axis=-1) - probs
    nucleus = jnp.where(before < top_p, ordered, jnp.inf)
    pth = jnp.where(top_p >= 1, -jnp.inf, jnp.min(nucleus, axis=-1, keepdims=True))
    return jnp.where((logits >= kth) & (logits >= pth), logits, -jnp.inf)


# Vocabulary entries per block of the two-level inverse-CDF search in `sample_categorical`.
CDF_BLOCK = 128


def sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One index of `logits` (V,) drawn with probability softmax(logits), from ONE uniform.

    Inverse CDF in two levels: the block of CDF_BLOCK entries the uniform falls in, from the
    running sum of the blocks' masses, then the entry inside that block. A Gumbel-max draw
    (`jax.random.categorical`) needs a random word per vocabulary entry: over 8192 image codes
    its threefry hashing cost more than a small model's whole decode step on a CPU. Entries of
    probability zero (logit -inf) are never drawn.
    """
    vocab = logits.shape[-1]
    blocks = -(-vocab // CDF_BLOCK)
    mass = jnp.exp(logits - jnp.max(logits))
    mass = jnp.pad(mass, (0, blocks * CDF_BLOCK - vocab)).reshape(blocks, CDF_BLOCK)
    block_mass = mass.sum(axis=-1)
    block_ends = jnp.cumsum(block_mass)
    target = jax.random.uniform(key, dtype=logits.dtype) * block_ends[-1]
    block = _first_past(block_ends, target, block_mass)
    before = jnp.where(block > 0, block_ends[block - 1], 0)
    return block * CDF_BLOCK + _first_past(before + jnp.cumsum(mass[block]), target, mass[block])


def _first_past(ends, target, mass):
    """The first index whose running mass `ends` passes `target`: one with mass of its own.
    Rounding can leave the target at or past the last end: the last index with mass then."""
    last_with_mass = mass.shape[0] - 1 - jnp.argmax(mass[::-1] > 0)
    return jnp.minimum(jnp.sum(ends <= target), last_with_mass)


def choose_tokens(logits, keys, position, controls) -> jax.Array:
    """One token per example: greedy at temperature 0, else sampled from the filtered logits
    with the example's key folded with `position`. Only the chosen way is computed."""
    def sampled(logits):
        temperature = jnp.maximum(controls["temperature"], 1e-6)
        filtered = filter_logits(logits / temperature, controls["top_k"], controls["top_p"])
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, position)
        return jax.vmap(sample_categorical)(step_keys, filtered)

    greedy = lambda logits: jnp.argmax(logits, axis=-1)
    return jax.lax.cond(controls["temperature"] > 0, sampled, greedy, logits).astype(jnp.int32)


def default_controls(batch: int) -> dict[str, jax.Array]:
    return {"temperature": jnp.float32(1.0), "top_k": jnp.int32(0), "top_p": jnp.float32(1.0),
            "guidance": jnp.float32(1.0), "given": jnp.zeros((batch, 0), jnp.int32),
            "keep": jnp.zeros((batch,), jnp.int32)}


def split_weights_by_default() -> bool:
    """Whether `sample_image_tokens` splits the layers' weights before its loop by default: on
    a CPU, where XLA copies a static slice of the stacked weights before the matmul that reads
    it, at every token (measured: BENCHMARKS.md, "Where a decode step's time goes"). The split
    holds a second copy of the stack's weights while sampling, so elsewhere, where device
    memory is scarce, each step scans the stacked weights layer by layer instead."""
    return jax.default_backend() == "cpu"


def sample_image_tokens(model, text: jax.Array, keys: jax.Array, controls: dict, *,
                        guided: bool = False, implementation: str = "sparse",
                        split_weights: bool | None = None) -> jax.Array:
    """Image tokens (B, N) for captions `text` (B, T), one random key per image.

    controls: "temperature", "top_k", "top_p", "guidance" (scalars) and, for completion,
    "given" (B, N) tokens of which the first "keep" (B,) are kept as they are.
    `guided` runs the unconditional stream (the empty caption) beside the conditional one in
    the same batch and mixes their logits with the "guidance" scale. `split_weights`: give each
    layer's weights arrays of their own once per draw (`DALLE.decode_weights`; default:
    `split_weights_by_default()`); the tokens are the same either way.
    """
    batch, n = text.shape[0], model.cfg.image_length
    given = controls["given"]
    if given.shape[1] == 0:
        given = jnp.zeros((batch, n), jnp.int32)
    streams = jnp.concatenate([text, empty_captions(*text.shape)]) if guided else text

    def choose(logits, position):
        if guided:
            logits = guided_logits(logits, controls["guidance"], batch)
        token = choose_tokens(logits, keys, position, controls)
        return jnp.where(position < controls["keep"], given[:, position], token)

    logits, cache = model.prefill(streams, model.init_cache(streams.shape[0]))
    tokens = jnp.zeros((batch, n), jnp.int32).at[:, 0].set(choose(logits, 0))
    if split_weights is None:
        split_weights = split_weights_by_default()
    weights = model.decode_weights() if split_weights else None

    def step(a, carry):
        tokens, cache = carry
        fed = jnp.concatenate([tokens[:, a]] * 2) if guided else tokens[:, a]
        logits, cache = model.decode_step(fed, a, cache, implementation, weights=weights)
        return tokens.at[:, a + 1].set(choose(logits, a + 1)), cache

    tokens, _ = jax.lax.fori_loop(0, n - 1, step, (tokens, cache))
    return tokens
