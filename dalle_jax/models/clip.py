"""CLIP: a ViT image encoder and a causal text encoder meeting in one normalised space.

Both towers are the project's one transformer (`transformer.Stack`, scanned over layers):

- Image: the uint8 image is scaled to [-1, 1] and cut into non-overlapping patch_size²
  patches in raster order; each flattened patch (patch²·3 values) goes through one linear
  layer (the ViT's patch embedding, a convolution with stride = kernel written as a matmul),
  plus a learned position embedding per patch (`image_position="learned"`) or fixed 2-D sine
  and cosine features of the patch's column and row (`"sincos2d"`, as big_vision's ViT). A
  pre-norm `Stack` of kind "full" over the `Layout(num_patches)` sequence, a final LayerNorm,
  then **mean pooling** over the patches by default (`image_pooling="mean"`; `"class"`
  prepends a learned class token, as CLIP's ViT does, and takes its output instead). Mean
  pooling keeps the sequence at exactly the patches (`Layout(num_patches)`); both are common
  and both are tested.
- Text: token + position embeddings, a `Stack` of kind "causal" over `Layout(text_length)`,
  a final LayerNorm, and the features at the end-of-caption position (captions are
  `[bos=2, words..., eos=3, pad=0...]`). Causality makes those features independent of the
  padding after the end token.

Each tower ends in a linear projection (no bias) into `embed_dim` and L2 normalisation. The
learned temperature `logit_scale` is a scalar parameter t initialised to log(1/0.07); the
similarity logits are exp(min(t, log 100))·I·Tᵀ, so the effective scale never exceeds 100
(CLIP clamps the parameter after each step; clamping in the forward pass has the same effect
and keeps the step a pure function).

    model = CLIP(clip_config(config.model, config.data, config.text, "float32"), rngs=rngs)
    image_embeddings = model.encode_images(images)   # uint8 (B, S, S, 3) -> float32 (B, E)
    text_embeddings = model.encode_text(ids)          # int32 (B, T) -> float32 (B, E)
    logits = model.logit_scale_value() * image_embeddings @ text_embeddings.T
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle_jax.models import attention as attention_lib
from dalle_jax.models import layers
from dalle_jax.models.transformer import ACT, REMAT_POLICIES, BlockConfig, Stack
from dalle_jax.text.tokenizer import EOS_ID, PAD_ID

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)
POOLINGS = ("mean", "class")
IMAGE_POSITIONS = ("learned", "sincos2d")


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    image_size: int
    patch_size: int
    text_length: int
    text_vocab_size: int
    embed_dim: int
    image: BlockConfig
    text: BlockConfig
    image_pooling: str = "mean"
    image_position: str = "learned"
    remat: str = "none"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * 3

    @property
    def image_length(self) -> int:
        """Positions the image tower sees: the patches, and the class token if any."""
        return self.num_patches + (self.image_pooling == "class")


def _positive(section: ml_collections.ConfigDict, key: str, where: str = "config.model"):
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}.{key}={value!r} must be positive")
    return value


def _tower(model, prefix: str, init_std: float, dtype: str) -> BlockConfig:
    width, depth, heads = (model[f"{prefix}_{k}"] for k in ("width", "depth", "heads"))
    for key in ("width", "depth", "heads"):
        if not isinstance(model[f"{prefix}_{key}"], int):
            raise ValueError(f"config.model.{prefix}_{key}={model[f'{prefix}_{key}']!r} must "
                             "be an int")
    if width % heads:
        raise ValueError(f"config.model.{prefix}_width={width} does not divide into "
                         f"config.model.{prefix}_heads={heads} heads")
    mlp_dim = width * model[f"{prefix}_mlp_ratio"]
    if mlp_dim != int(mlp_dim) or mlp_dim < 1:
        raise ValueError(f"config.model.{prefix}_mlp_ratio={model[f'{prefix}_mlp_ratio']} "
                         f"times {prefix}_width={width} is not a positive whole MLP width")
    return BlockConfig(d_model=width, num_heads=heads, head_dim=width // heads,
                       mlp_dim=int(mlp_dim), depth=depth, init_std=init_std, dtype=dtype)


def clip_config(model: ml_collections.ConfigDict, data: ml_collections.ConfigDict,
                text: ml_collections.ConfigDict, compute_dtype: str) -> ClipConfig:
    """The model's settings from `config.model`, `config.data` and `config.text`.

    Every bad value is a one-line ValueError naming its key.
    """
    for key in ("patch_size", "embed_dim", "init_std", "image_width", "image_depth",
                "image_heads", "image_mlp_ratio", "text_width", "text_depth", "text_heads",
                "text_mlp_ratio"):
        _positive(model, key)
    for key in ("patch_size", "embed_dim"):
        if not isinstance(model[key], int):
            raise ValueError(f"config.model.{key}={model[key]!r} must be an int")
    if data.image_size % model.patch_size:
        raise ValueError(f"config.model.patch_size={model.patch_size} does not divide "
                         f"config.data.image_size={data.image_size}")
    if model.image_pooling not in POOLINGS:
        raise ValueError(f"config.model.image_pooling={model.image_pooling!r} must be one of "
                         f"{POOLINGS}")
    # Workdirs written before the option existed have no key: they learned their table.
    image_position = model.get("image_position", "learned")
    if image_position not in IMAGE_POSITIONS:
        raise ValueError(f"config.model.image_position={image_position!r} must be one of "
                         f"{IMAGE_POSITIONS}")
    if image_position == "sincos2d" and model.image_width % 4:
        raise ValueError(f"config.model.image_width={model.image_width} must be a multiple of "
                         "4 for image_position='sincos2d'")
    if model.remat not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat={model.remat!r} must be one of {REMAT_POLICIES}")
    return ClipConfig(
        image_size=data.image_size, patch_size=model.patch_size, text_length=text.length,
        text_vocab_size=text.vocab_size, embed_dim=model.embed_dim,
        image=_tower(model, "image", model.init_std, compute_dtype),
        text=_tower(model, "text", model.init_std, compute_dtype),
        image_pooling=model.image_pooling, image_position=image_position, remat=model.remat)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, S, S, C) -> (B, (S/p)², p·p·C): patches in raster order, each row-major (y, x, c)."""
    b, s, _, c = images.shape
    g = s // patch_size
    x = images.reshape(b, g, patch_size, g, patch_size, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, patch_size * patch_size * c)


def sincos_2d(grid_size: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """(grid², width) fixed position features of a raster-order patch grid, as big_vision's
    `posemb_sincos_2d`: sin and cos of x and of y, each at width/4 geometric frequencies."""
    y, x = jnp.mgrid[:grid_size, :grid_size]
    omega = 1.0 / temperature ** (jnp.arange(width // 4) / max(width // 4 - 1, 1))
    y = y.reshape(-1, 1) * omega[None]
    x = x.reshape(-1, 1) * omega[None]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def eos_positions(text: jax.Array) -> jax.Array:
    """(B,) index of each caption's end token; the last non-pad position if it has none."""
    has_eos = jnp.any(text == EOS_ID, axis=1)
    last = jnp.maximum(jnp.sum(text != PAD_ID, axis=1) - 1, 0)
    return jnp.where(has_eos, jnp.argmax(text == EOS_ID, axis=1), last).astype(jnp.int32)


class CLIP(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        vi, tx = cfg.image, cfg.text
        std = vi.init_std
        # --- image tower ---
        self.patch_embed = layers.new_param(rngs, layers.normal(cfg.patch_dim ** -0.5),
                                            (cfg.patch_dim, vi.d_model), ("channels", "embed"))
        self.patch_bias = layers.new_param(rngs, nnx.initializers.zeros_init(), (vi.d_model,),
                                           ("norm",))
        if cfg.image_position == "learned":
            self.image_position = layers.Embed(cfg.image_length, vi.d_model,
                                               ("length", "embed"), std=std, rngs=rngs)
        if cfg.image_pooling == "class":
            self.class_token = layers.new_param(rngs, layers.normal(std), (vi.d_model,),
                                                ("embed",))
        self.image_pre_norm = layers.LayerNorm(vi.d_model, rngs=rngs)
        self.image_stack = Stack(vi, ("full",) * vi.depth, attention_lib.Layout(cfg.image_length),
                                 remat=cfg.remat, rngs=rngs)
        self.image_norm = layers.LayerNorm(vi.d_model, rngs=rngs)
        self.image_projection = layers.new_param(rngs, layers.normal(vi.d_model ** -0.5),
                                                 (vi.d_model, cfg.embed_dim), ("embed", None))
        # --- text tower ---
        self.token_embed = layers.Embed(cfg.text_vocab_size, tx.d_model, ("vocab", "embed"),
                                        std=tx.init_std, rngs=rngs)
        self.text_position = layers.Embed(cfg.text_length, tx.d_model, ("length", "embed"),
                                          std=tx.init_std, rngs=rngs)
        self.text_stack = Stack(tx, ("causal",) * tx.depth, attention_lib.Layout(cfg.text_length),
                                remat=cfg.remat, rngs=rngs)
        self.text_norm = layers.LayerNorm(tx.d_model, rngs=rngs)
        self.text_projection = layers.new_param(rngs, layers.normal(tx.d_model ** -0.5),
                                                (tx.d_model, cfg.embed_dim), ("embed", None))
        # --- temperature ---
        self.logit_scale = layers.new_param(rngs, nnx.initializers.constant(LOGIT_SCALE_INIT),
                                            (), ())

    # --- image tower ----------------------------------------------------------------------

    def image_features(self, images: jax.Array) -> jax.Array:
        """uint8 (B, S, S, 3) -> pooled, normalised tower features (B, image_width)."""
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.image.dtype)
        x = images.astype(jnp.float32) / 127.5 - 1.0
        patches = patchify(x, cfg.patch_size).astype(dtype)
        x = patches @ self.patch_embed[...].astype(dtype) + self.patch_bias[...].astype(dtype)
        if cfg.image_position == "sincos2d":
            # Fixed features the size of the patches' own (a learned table starts at
            # init_std, 50 times smaller, and places are learned late), none on the class token.
            x = x + sincos_2d(cfg.grid_size, x.shape[-1])[None].astype(dtype)
        if cfg.image_pooling == "class":
            token = jnp.broadcast_to(self.class_token[...].astype(dtype),
                                     (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([token, x], axis=1)
        if cfg.image_position == "learned":
            x = x + self.image_position(jnp.arange(cfg.image_length))[None].astype(dtype)
        # CLIP's ViT normalises the embedded sequence before the first block.
        x = layers.constrain(self.image_pre_norm(x), ACT)
        h = self.image_norm(self.image_stack(x))
        if cfg.image_pooling == "class":
            return h[:, 0]
        return jnp.mean(h.astype(jnp.float32), axis=1)

    def encode_images(self, images: jax.Array) -> jax.Array:
        """uint8 (B, S, S, 3) -> L2-normalised float32 embeddings (B, embed_dim)."""
        h = self.image_features(images)
        return l2_normalize(h.astype(jnp.float32) @ self.image_projection[...])

    # --- text tower -----------------------------------------------------------------------

    def text_features(self, text: jax.Array) -> jax.Array:
        """int32 (B, T) -> the final-norm features at each caption's end token (B, text_width)."""
        dtype = jnp.dtype(self.cfg.text.dtype)
        x = self.token_embed(text) + self.text_position(jnp.arange(self.cfg.text_length))[None]
        h = self.text_norm(self.text_stack(layers.constrain(x.astype(dtype), ACT)))
        index = eos_positions(text)
        return jnp.take_along_axis(h, index[:, None, None], axis=1)[:, 0]

    def encode_text(self, text: jax.Array) -> jax.Array:
        """int32 (B, T) captions -> L2-normalised float32 embeddings (B, embed_dim)."""
        h = self.text_features(text)
        return l2_normalize(h.astype(jnp.float32) @ self.text_projection[...])

    # --- temperature ----------------------------------------------------------------------

    def logit_scale_value(self) -> jax.Array:
        """exp(t) clipped at 100: the factor between cosine similarities and logits."""
        return jnp.exp(jnp.minimum(self.logit_scale[...], LOGIT_SCALE_MAX))

    def __call__(self, images: jax.Array, text: jax.Array):
        """(image embeddings (B, E), text embeddings (B, E), logit scale ())."""
        return self.encode_images(images), self.encode_text(text), self.logit_scale_value()


def flops_per_example(cfg: ClipConfig, batch_size: int, images: int = 1,
                      captions: int = 1) -> float:
    """Training FLOPs of one example (3 × forward), counted by formula as for the transformer:
    projections and MLPs at every position, attention scores and weighted sums, the patch
    embedding and output projections, and the example's share of the B×B similarity. An
    example with hard negatives encodes `images` images and `captions` captions."""
    def tower(block: BlockConfig, length: int, kind: str) -> float:
        inner = block.num_heads * block.head_dim
        per_position = 2 * (4 * block.d_model * inner + 2 * block.d_model * block.mlp_dim)
        scores = attention_lib.kept_score_count(kind, attention_lib.Layout(length))
        return block.depth * (length * per_position + 4 * inner * scores)

    image = (tower(cfg.image, cfg.image_length, "full")
             + 2 * cfg.num_patches * cfg.patch_dim * cfg.image.d_model
             + 2 * cfg.embed_dim * cfg.image.d_model)
    text = tower(cfg.text, cfg.text_length, "causal") + 2 * cfg.embed_dim * cfg.text.d_model
    forward = images * image + captions * text + 2 * batch_size * cfg.embed_dim * captions
    return 3.0 * forward


def from_config(config: ml_collections.ConfigDict, rngs: nnx.Rngs, *,
                dtype: str | None = None) -> CLIP:
    """The CLIP of a run's config, computing in `dtype` (default: `config.train.compute_dtype`)."""
    return CLIP(clip_config(config.model, config.data, config.text,
                            dtype or config.train.compute_dtype), rngs=rngs)
