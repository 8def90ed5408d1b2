"""OpenAI's discrete VAE (the DALL·E image tokenizer) in Flax NNX, NHWC.

The layout follows the released `dall_e` package (attribute names mirror its modules, which keeps
a weight converter a matter of transposes): a bottleneck-ResNet encoder that downsamples by
2^(num_groups-1) to a grid of `vocab_size` logits, and a mirrored decoder whose first 1×1
convolution reads a one-hot (or Gumbel-relaxed) grid of codes, i.e. it *is* the codebook.

Parameters are float32; the convolutions compute in `dtype` except the encoder's logits and
the decoder's codebook, which stay float32 as in the release (their softmax / one-hot sides
have 8192 channels, where bfloat16 rounding would matter most).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from dalle_jax.models import layers

LOGIT_LAPLACE_EPS = 0.1
KERNEL_AXES = ("conv_window", "conv_window", "conv_in", "conv_out")
ACTIVATION_AXES = ("batch", "height", "width", "channels")
OUTPUT_CHANNELS = 3  # RGB; the decoder emits a mean and a log-scale for each


# --- pixels -------------------------------------------------------------------------------

def to_unit_float(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]; float images are taken to be in [0, 1] already."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def map_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    """[0, 1] -> [eps, 1-eps], where the logit-Laplace density is finite."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: jax.Array, eps: float = LOGIT_LAPLACE_EPS) -> jax.Array:
    return jnp.clip((x - eps) / (1 - 2 * eps), 0.0, 1.0)


def constrain(x: jax.Array, names=ACTIVATION_AXES) -> jax.Array:
    return layers.constrain(x, names)


# --- layers -------------------------------------------------------------------------------

class Conv(nnx.Module):
    """Stride-1 'same' convolution, weights N(0, 1/fan_in) as in the release, zero bias.

    `out_axis=None` leaves the output channels unsharded, for layers too narrow to split.
    """

    def __init__(self, n_in: int, n_out: int, kernel_size: int, *, dtype, rngs: nnx.Rngs,
                 out_axis: str | None = "conv_out"):
        axes = KERNEL_AXES[:3] + (out_axis,)
        fan_in = n_in * kernel_size * kernel_size
        kernel_init = nnx.with_partitioning(nnx.initializers.normal(stddev=fan_in ** -0.5), axes)
        bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), (out_axis,))
        shape = (kernel_size, kernel_size, n_in, n_out)
        self.kernel = layers.param(kernel_init(rngs.params(), shape, jnp.float32))
        self.bias = layers.param(bias_init(rngs.params(), (n_out,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        missing = -x.shape[-1] % 4
        if missing:
            # Zero channels up to a multiple of 4 leave the result as it is, but XLA:CPU's
            # convolution library runs the RGB input layer 2-4× faster with a fourth channel
            # (BENCHMARKS.md, "Where the main job's train steps spend their time").
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, missing)))
            kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, missing), (0, 0)))
        y = jax.lax.conv_general_dilated(
            x, kernel, window_strides=(1, 1), padding="SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class ResBlock(nnx.Module):
    """Bottleneck residual block: out = id(x) + post_gain · res(x), with res = 4 ReLU-convs.

    The encoder's kernels are (3, 3, 3, 1), the decoder's (1, 3, 3, 3). The small post-gain
    (1/n_layers²) keeps the stack near the identity at initialisation.
    """

    def __init__(self, n_in: int, n_out: int, kernel_sizes: tuple[int, ...], post_gain: float, *,
                 dtype, rngs: nnx.Rngs):
        hidden = n_out // 4
        widths = (n_in,) + (hidden,) * (len(kernel_sizes) - 1) + (n_out,)
        self.id_path = Conv(n_in, n_out, 1, dtype=dtype, rngs=rngs) if n_in != n_out else None
        self.res_path = nnx.List([Conv(widths[i], widths[i + 1], k, dtype=dtype, rngs=rngs)
                                  for i, k in enumerate(kernel_sizes)])
        self.post_gain = post_gain

    def residual(self, x: jax.Array) -> jax.Array:
        for conv in self.res_path:
            x = conv(jax.nn.relu(x))
        return x

    def __call__(self, x: jax.Array) -> jax.Array:
        identity = x if self.id_path is None else self.id_path(x)
        return constrain(identity + self.post_gain * self.residual(x))


ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


def group_widths(n_hid: int, num_groups: int) -> tuple[int, ...]:
    """Encoder widths n_hid·(1, 2, 4, ...); the decoder uses them reversed."""
    return tuple(n_hid * 2 ** g for g in range(num_groups))


def _blocks(n_in: int, width: int, cfg, kernels, post_gain, dtype, rngs) -> nnx.List:
    return nnx.List([ResBlock(n_in if i == 0 else width, width, kernels, post_gain,
                              dtype=dtype, rngs=rngs) for i in range(cfg.blocks_per_group)])


def _post_gain(cfg) -> float:
    return 1.0 / (cfg.num_groups * cfg.blocks_per_group) ** 2


class Encoder(nnx.Module):
    """Images in [eps, 1-eps] (B, S, S, 3) -> float32 logits (B, S/f, S/f, vocab_size)."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        widths = group_widths(cfg.n_hid, cfg.num_groups)
        self.input_conv = Conv(OUTPUT_CHANNELS, cfg.n_hid, 7, dtype=dtype, rngs=rngs)
        self.groups = nnx.List([
            _blocks(widths[g - 1] if g else cfg.n_hid, width, cfg, ENCODER_KERNELS,
                    _post_gain(cfg), dtype, rngs)
            for g, width in enumerate(widths)])
        self.output_conv = Conv(widths[-1], cfg.vocab_size, 1, dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(self.input_conv(x))
        for g, blocks in enumerate(self.groups):
            for block in blocks:
                x = block(x)
            if g < len(self.groups) - 1:
                x = max_pool_2x2(x)
        return constrain(self.output_conv(jax.nn.relu(x)))


class Decoder(nnx.Module):
    """A (relaxed) one-hot grid (B, h, w, vocab_size) -> float32 (mu, log_b), each (B, S, S, 3)."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        widths = group_widths(cfg.n_hid, cfg.num_groups)[::-1]
        self.input_conv = Conv(cfg.vocab_size, cfg.n_init, 1, dtype=jnp.float32, rngs=rngs)
        self.groups = nnx.List([
            _blocks(widths[g - 1] if g else cfg.n_init, width, cfg, DECODER_KERNELS,
                    _post_gain(cfg), dtype, rngs)
            for g, width in enumerate(widths)])
        # Six output channels do not split over an FSDP axis, and the layer is tiny: replicate it.
        self.output_conv = Conv(widths[-1], 2 * OUTPUT_CHANNELS, 1, dtype=dtype, rngs=rngs,
                                out_axis=None)

    def codebook_embed(self, tokens: jax.Array) -> jax.Array:
        """The codebook conv applied to one_hot(tokens), as a gather (no vocab-wide matmul)."""
        return self.input_conv.kernel[0, 0][tokens] + self.input_conv.bias[...]

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.from_codebook(self.input_conv(z.astype(jnp.float32)))

    def from_codebook(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = constrain(x)
        for g, blocks in enumerate(self.groups):
            for block in blocks:
                x = block(x)
            if g < len(self.groups) - 1:
                x = upsample_nearest_2x(x)
        stats = constrain(self.output_conv(jax.nn.relu(x))).astype(jnp.float32)
        return stats[..., :OUTPUT_CHANNELS], stats[..., OUTPUT_CHANNELS:]


# --- the model ----------------------------------------------------------------------------

def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
    """One-line ValueErrors naming the bad `config.model` key."""
    for key in ("image_size", "n_hid", "num_groups", "blocks_per_group", "n_init"):
        if cfg[key] < 1:
            raise ValueError(f"config.model.{key}={cfg[key]} must be positive")
    if cfg.vocab_size < 2:
        raise ValueError(f"config.model.vocab_size={cfg.vocab_size} must be at least 2")
    if cfg.n_hid % 4:
        raise ValueError(f"config.model.n_hid={cfg.n_hid} must divide by 4 (bottleneck width n/4)")
    factor = 2 ** (cfg.num_groups - 1)
    if cfg.image_size % factor:
        raise ValueError(f"config.model.image_size={cfg.image_size} must divide by "
                         f"2^(num_groups-1)={factor}")


def downsampling_factor(cfg) -> int:
    return 2 ** (cfg.num_groups - 1)


class DVAE(nnx.Module):
    """Encoder + decoder with the tokenizer API the transformer stage uses.

    `images` are uint8 (B, S, S, 3) or float in [0, 1]; they are mapped to [eps, 1-eps] before
    the encoder, as OpenAI's `map_pixels` does.
    """

    def __init__(self, model_config, dtype=jnp.float32, rngs: nnx.Rngs | None = None, *,
                 eps: float = LOGIT_LAPLACE_EPS):
        if rngs is None:
            raise ValueError("DVAE needs rngs=nnx.Rngs(...) to initialise its parameters")
        validate_model_config(model_config)
        dtype = jnp.dtype(dtype)
        self.image_size = model_config.image_size
        self.grid_size = model_config.image_size // downsampling_factor(model_config)
        self.vocab_size = model_config.vocab_size
        self.eps = eps
        self.encoder = Encoder(model_config, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(model_config, dtype=dtype, rngs=rngs)

    def encoder_logits(self, images: jax.Array) -> jax.Array:
        """float32 logits (B, h, w, vocab_size)."""
        return self.encoder(map_pixels(to_unit_float(images), self.eps))

    def encode(self, images: jax.Array) -> jax.Array:
        """int32 tokens (B, h, w): the argmax of the logits, no noise."""
        return jnp.argmax(self.encoder_logits(images), axis=-1).astype(jnp.int32)

    def decode_logits(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mu, log_b) of the logit-Laplace pixel distribution from a (relaxed) one-hot grid."""
        return self.decoder(z)

    def decode(self, tokens: jax.Array) -> jax.Array:
        """float32 images in [0, 1] (B, S, S, 3) from int tokens (B, h, w)."""
        mu, _ = self.decoder.from_codebook(self.decoder.codebook_embed(tokens))
        return unmap_pixels(jax.nn.sigmoid(mu), self.eps)


def from_config(config: ml_collections.ConfigDict, rngs: nnx.Rngs, *,
                dtype: str | None = None) -> DVAE:
    """The dVAE of a run's config (`config.model`, the task's pixel map), computing in `dtype`
    (default: `config.train.compute_dtype`)."""
    return DVAE(config.model, jnp.dtype(dtype or config.train.compute_dtype), rngs,
                eps=config.task.get("logit_laplace_eps", LOGIT_LAPLACE_EPS))
