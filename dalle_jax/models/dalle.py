"""The DALL·E transformer: one decoder-only stream of [caption tokens | image tokens].

Position i's input is token i and its output predicts token i+1, so the last caption position
predicts the first image token and the last image position predicts nothing. Captions arrive as
`[bos, words..., eos, 0, 0, ...]` (id 0 = padding); every padded position gets **its own**
learned padding embedding, as in the paper, so the model always sees a full-length caption.

Logits are restricted by segment: caption positions are scored against the text vocabulary
only and image positions against the image vocabulary only (two output heads), so a sampled
image can never contain a text token.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle_jax.models import attention as attention_lib
from dalle_jax.models import layers
from dalle_jax.models.transformer import ACT, BlockConfig, DecodeLayer, Stack
from dalle_jax.text.tokenizer import BOS_ID, EOS_ID, PAD_ID

# The key/value cache is split like the activations it caches: batch over the data axes, heads
# over tensor.
CACHE_NAMES = ("batch", "heads", "length", "kv")


@dataclasses.dataclass(frozen=True)
class DalleConfig:
    text_length: int
    text_vocab_size: int
    image_vocab_size: int
    grid_size: int
    block: BlockConfig
    conv_kernel: int = 11
    attention: str = "sparse"  # or "dense": the masked reference
    remat: str = "none"
    scan_unroll: int = 1
    layers: str = "paper"  # the attention kind of each layer (attention.layer_kinds)

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        return attention_lib.layer_kinds(self.block.depth, self.layers)

    @property
    def layout(self) -> attention_lib.Layout:
        return attention_lib.Layout(self.text_length, self.grid_size, self.grid_size,
                                    self.conv_kernel)

    @property
    def image_length(self) -> int:
        return self.grid_size * self.grid_size


def dalle_config(model: ml_collections.ConfigDict, text: ml_collections.ConfigDict,
                 compute_dtype: str) -> DalleConfig:
    """The model's settings from `config.model` and `config.text`, with one-line errors."""
    for key in ("grid_size", "image_vocab_size", "d_model", "num_heads", "head_dim", "mlp_dim",
                "depth"):
        if model[key] < 1:
            raise ValueError(f"config.model.{key}={model[key]} must be positive")
    # Workdirs written before the option existed have no key: they scanned one layer at a time.
    scan_unroll = model.get("scan_unroll", 1)
    if not 1 <= scan_unroll <= model.depth:
        raise ValueError(f"config.model.scan_unroll={scan_unroll} must be between 1 and "
                         f"config.model.depth={model.depth}")
    if model.attention not in ("sparse", "dense"):
        raise ValueError(f"config.model.attention={model.attention!r} must be 'sparse' or 'dense'")
    # Workdirs written before the option existed have no key: they used the paper's layers.
    layers = model.get("layers", "paper")
    if layers not in attention_lib.LAYER_PATTERNS:
        raise ValueError(f"config.model.layers={layers!r} must be one of "
                         f"{attention_lib.LAYER_PATTERNS}")
    block = BlockConfig(d_model=model.d_model, num_heads=model.num_heads,
                        head_dim=model.head_dim, mlp_dim=model.mlp_dim, depth=model.depth,
                        init_std=model.init_std, dtype=compute_dtype)
    return DalleConfig(text_length=text.length, text_vocab_size=text.vocab_size,
                       image_vocab_size=model.image_vocab_size, grid_size=model.grid_size,
                       block=block, conv_kernel=model.conv_kernel, attention=model.attention,
                       remat=model.remat, scan_unroll=scan_unroll, layers=layers)


def empty_captions(batch_size: int, length: int) -> jax.Array:
    """[bos, eos, pad, ...]: the caption of the unconditional model (classifier-free guidance)."""
    caption = jnp.zeros((length,), jnp.int32).at[0].set(BOS_ID).at[1].set(EOS_ID)
    return jnp.broadcast_to(caption, (batch_size, length))


class DALLE(nnx.Module):
    def __init__(self, cfg: DalleConfig, *, rngs: nnx.Rngs):
        d, std = cfg.block.d_model, cfg.block.init_std
        self.cfg = cfg
        self.text_embed = layers.Embed(cfg.text_vocab_size, d, ("vocab", "embed"), std=std,
                                       rngs=rngs)
        self.pad_embed = layers.Embed(cfg.text_length, d, ("length", "embed"), std=std,
                                      rngs=rngs)
        self.text_position = layers.Embed(cfg.text_length, d, ("length", "embed"), std=std,
                                          rngs=rngs)
        self.image_embed = layers.Embed(cfg.image_vocab_size, d, ("vocab", "embed"), std=std,
                                        rngs=rngs)
        self.row_embed = layers.Embed(cfg.grid_size, d, ("length", "embed"), std=std, rngs=rngs)
        self.column_embed = layers.Embed(cfg.grid_size, d, ("length", "embed"), std=std,
                                         rngs=rngs)
        self.stack = Stack(cfg.block, cfg.layer_kinds, cfg.layout,
                           implementation=cfg.attention, remat=cfg.remat,
                           scan_unroll=cfg.scan_unroll, rngs=rngs)
        self.final_norm = layers.LayerNorm(d, rngs=rngs)
        self.text_head = layers.new_param(rngs, layers.normal(std), (d, cfg.text_vocab_size),
                                          ("embed", "vocab"))
        self.image_head = layers.new_param(rngs, layers.normal(std), (d, cfg.image_vocab_size),
                                           ("embed", "vocab"))

    # --- embeddings ---------------------------------------------------------------------

    def embed_text(self, text: jax.Array) -> jax.Array:
        """(B, T) ids -> (B, T, d): token + position, with each pad replaced by its own token."""
        positions = jnp.arange(self.cfg.text_length)
        tokens = jnp.where((text == PAD_ID)[..., None], self.pad_embed(positions)[None],
                           self.text_embed(text))
        return tokens + self.text_position(positions)[None]

    def embed_image(self, image_tokens: jax.Array) -> jax.Array:
        """(B, N) raster-order codes -> (B, N, d): token + row + column."""
        g = self.cfg.grid_size
        rows, cols = jnp.divmod(jnp.arange(image_tokens.shape[1]), g)
        return self.image_embed(image_tokens) + (self.row_embed(rows) + self.column_embed(cols))[None]

    def embed(self, text: jax.Array, image_tokens: jax.Array) -> jax.Array:
        x = jnp.concatenate([self.embed_text(text), self.embed_image(image_tokens)], axis=1)
        return layers.constrain(x.astype(jnp.dtype(self.cfg.block.dtype)), ACT)

    # --- forward ------------------------------------------------------------------------

    def hidden(self, text: jax.Array, image_tokens: jax.Array) -> jax.Array:
        """Final-norm features (B, T + N, d) of the whole stream."""
        return self.final_norm(self.stack(self.embed(text, image_tokens)))

    def text_logits(self, h: jax.Array) -> jax.Array:
        return jnp.einsum("bld,dv->blv", h.astype(jnp.float32), self.text_head[...])

    def image_logits(self, h: jax.Array) -> jax.Array:
        return jnp.einsum("bld,dv->blv", h.astype(jnp.float32), self.image_head[...])

    def __call__(self, text: jax.Array, image_tokens: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
        """float32 logits for next-token prediction, restricted by segment.

        Returns (text_logits (B, T-1, text_vocab): predictions of text[:, 1:],
                 image_logits (B, N, image_vocab): predictions of image_tokens[:, 0:N]).
        """
        t = self.cfg.text_length
        h = self.hidden(text, image_tokens)
        return self.text_logits(h[:, :t - 1]), self.image_logits(h[:, t - 1:-1])

    # --- decoding with a key/value cache (dalle_jax/sampling uses these) ------------------

    def init_cache(self, batch: int, dtype=None) -> tuple[attention_lib.LayerCache, ...]:
        """Zeroed keys and values, one `LayerCache` per layer ([batch, heads, text or image
        length, head_dim]), in `dtype` (default: the compute dtype, in which they are
        computed)."""
        b = self.cfg.block
        dtype = jnp.dtype(dtype or b.dtype)

        def zeros(length):
            shape = (batch, b.num_heads, length, b.head_dim)
            return layers.constrain(jnp.zeros(shape, dtype), CACHE_NAMES)

        t, n = self.cfg.text_length, self.cfg.image_length
        return tuple(attention_lib.LayerCache(zeros(t), zeros(t), zeros(n), zeros(n))
                     for _ in range(b.depth))

    def prefill(self, text: jax.Array, cache: tuple[attention_lib.LayerCache, ...]):
        """The caption in one pass: (logits of the first image token (B, image_vocab), cache
        with every layer's caption entries written)."""
        x = self.embed_text(text).astype(jnp.dtype(self.cfg.block.dtype))
        x, keys, values = self.stack.prefill(x)

        def heads_major(new, old):  # [B, T, heads, head_dim] -> the cache's layout
            return layers.constrain(jnp.swapaxes(new, 1, 2).astype(old.dtype), CACHE_NAMES)

        cache = tuple(c._replace(text_keys=heads_major(keys[i], c.text_keys),
                                 text_values=heads_major(values[i], c.text_values))
                      for i, c in enumerate(cache))
        return self.image_logits(self.final_norm(x[:, -1:]))[:, 0], cache

    def decode_weights(self) -> tuple[DecodeLayer, ...]:
        """The stack's parameters layer by layer (`Stack.layer_weights`): computed once before
        a loop of `decode_step`s, which then read them in place."""
        return self.stack.layer_weights()

    def decode_step(self, token: jax.Array, a: jax.Array, cache, implementation="sparse", *,
                    weights=None):
        """Feed image token `a` (B,): (logits of token a+1 (B, image_vocab), cache).
        `weights`: `decode_weights()` (default: the stacked weights, layer by layer)."""
        g = self.cfg.grid_size
        x = (self.image_embed(token) + self.row_embed(a // g) + self.column_embed(a % g))[:, None]
        x, cache = self.stack.decode(x.astype(jnp.dtype(self.cfg.block.dtype)), cache, a,
                                     implementation, weights=weights)
        return self.image_logits(self.final_norm(x))[:, 0], cache


def flops_per_example(cfg: DalleConfig) -> float:
    """Training FLOPs of one example (forward + backward = 3 × forward), counted by formula.

    Matmuls count 2 FLOPs per multiply-add: q/k/v/out projections and the MLP at every
    position, the two output heads at the positions they score, and for attention only the
    (query, key) pairs its mask keeps (q·k and the weighted sum of values). Embedding lookups,
    norms and softmax are left out, as in the usual 6·N·tokens accounting.
    """
    b = cfg.block
    length = cfg.text_length + cfg.image_length
    inner = b.num_heads * b.head_dim
    per_position = 2 * (4 * b.d_model * inner + 2 * b.d_model * b.mlp_dim)
    heads = 2 * b.d_model * (cfg.text_vocab_size * (cfg.text_length - 1)
                             + cfg.image_vocab_size * cfg.image_length)
    attention = sum(4 * inner * attention_lib.kept_score_count(kind, cfg.layout)
                    for kind in cfg.layer_kinds)
    return 3.0 * (b.depth * length * per_position + heads + attention)



def from_config(config: ml_collections.ConfigDict, rngs: nnx.Rngs, *,
                dtype: str | None = None) -> DALLE:
    """The transformer of a run's config, computing in `dtype` (default:
    `config.train.compute_dtype`)."""
    return DALLE(dalle_config(config.model, config.text, dtype or config.train.compute_dtype),
                 rngs=rngs)
