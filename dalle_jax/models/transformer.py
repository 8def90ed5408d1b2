"""The one transformer block, and a stack of them scanned over depth.

The DALL·E transformer and CLIP's text encoder both use `Stack`; they differ only in the
attention kind of each layer ("row"/"column"/"conv" for DALL·E, "causal" for CLIP's text,
"full" for a ViT) and in the `Layout` of the sequence.

Layers are stacked on a leading "layers" axis and applied with `lax.scan`, so compile time does
not grow with depth (`scan_unroll` layers per loop iteration: a few small layers run faster
unrolled, without the loop's per-layer slicing and stacking). Layers of different kinds share
one scan body: the kind of each layer is an index into the kinds the stack uses and
`lax.switch` picks the attention, which only changes which keys a query sees (the projections
are the same). Decoding one position against a key/value cache (`Stack.decode`) can also run
its layers unrolled, each reading its own weights and cache with its own kind.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dalle_jax.models import attention as attention_lib
from dalle_jax.models import layers

ACT = ("batch", "length", "act_embed")
REMAT_POLICIES = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    d_model: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    depth: int  # of the whole stack: sets the residual branches' initial gain
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype; parameters stay float32

    def __post_init__(self):
        for field in ("d_model", "num_heads", "head_dim", "mlp_dim", "depth"):
            if getattr(self, field) < 1:
                raise ValueError(f"config.model.{field}={getattr(self, field)} must be positive")

    @property
    def residual_std(self) -> float:
        """Output projections start small (GPT-2's 1/sqrt(2·depth)), so each residual branch
        adds little at initialisation and a deep pre-norm stack starts near the identity."""
        return self.init_std / math.sqrt(2 * self.depth)


class Attention(nnx.Module):
    """Multi-head self-attention; heads are split over the tensor axis (Megatron style)."""

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
        init = layers.normal(cfg.init_std)
        self.query = layers.new_param(rngs, init, (d, h, k), ("embed", "heads", "kv"))
        self.key = layers.new_param(rngs, init, (d, h, k), ("embed", "heads", "kv"))
        self.value = layers.new_param(rngs, init, (d, h, k), ("embed", "heads", "kv"))
        self.out = layers.new_param(rngs, layers.normal(cfg.residual_std), (h, k, d),
                                    ("heads", "kv", "embed"))
        self.dtype = jnp.dtype(cfg.dtype)

    def project(self, x: jax.Array, qkv: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, L, d) -> q, k, v, each (B, L, heads, head_dim).

        qkv: `fused_qkv()`, made once outside a loop of decode steps: one matmul then reads the
        three projections (a decode step's matmuls are so small that their number counts).
        """
        x = x.astype(self.dtype)
        names = ("batch", "length", "heads", "kv")
        if qkv is not None:
            h, k = self.query.shape[1:]
            fused = (x @ qkv.astype(self.dtype)).reshape(x.shape[:2] + (3, h, k))
            return tuple(layers.constrain(fused[:, :, i], names) for i in range(3))
        return tuple(layers.constrain(jnp.einsum("bld,dhk->blhk", x, w[...].astype(self.dtype)),
                                      names)
                     for w in (self.query, self.key, self.value))

    def fused_qkv(self) -> jax.Array:
        """The query, key and value projections side by side, [d_model, 3·heads·head_dim]: the
        layout a row-major matmul reads as it is."""
        return jnp.stack([w[...] for w in (self.query, self.key, self.value)], axis=1).reshape(
            self.query.shape[0], -1)

    def output(self, o: jax.Array) -> jax.Array:
        return layers.constrain(
            jnp.einsum("blhk,hkd->bld", o.astype(self.dtype), self.out[...].astype(self.dtype)),
            ACT)


class MLP(nnx.Module):
    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        self.up = layers.new_param(rngs, layers.normal(cfg.init_std), (cfg.d_model, cfg.mlp_dim),
                                   ("embed", "mlp"))
        self.up_bias = layers.new_param(rngs, nnx.initializers.zeros_init(), (cfg.mlp_dim,),
                                        ("mlp",))
        self.down = layers.new_param(rngs, layers.normal(cfg.residual_std),
                                     (cfg.mlp_dim, cfg.d_model), ("mlp", "embed"))
        self.down_bias = layers.new_param(rngs, nnx.initializers.zeros_init(), (cfg.d_model,),
                                          ("norm",))
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        h = x @ self.up[...].astype(self.dtype) + self.up_bias[...].astype(self.dtype)
        h = layers.constrain(jax.nn.gelu(h), ("batch", "length", "mlp"))
        y = h @ self.down[...].astype(self.dtype) + self.down_bias[...].astype(self.dtype)
        return layers.constrain(y, ACT)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: BlockConfig, *, rngs: nnx.Rngs):
        self.attention_norm = layers.LayerNorm(cfg.d_model, rngs=rngs)
        self.attention = Attention(cfg, rngs=rngs)
        self.mlp_norm = layers.LayerNorm(cfg.d_model, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, attend, qkv: jax.Array | None = None):
        """(x, extra), where `attend(q, k, v) -> (o, extra)` is the layer's attention: the
        training pattern (extra None), or a cached decode that returns the updated cache.
        qkv: the fused projections of a decode (`Attention.project`)."""
        q, k, v = self.attention.project(self.attention_norm(x), qkv)
        o, extra = attend(q, k, v)
        x = x + self.attention.output(o).astype(x.dtype)
        return layers.constrain(x + self.mlp(self.mlp_norm(x)).astype(x.dtype), ACT), extra


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "save_dots":
        return jax.checkpoint(
            fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"config.model.remat={policy!r} must be one of {REMAT_POLICIES}")


class DecodeLayer(NamedTuple):
    """One layer's weights as a decode step reads them (`Stack.layer_weights`)."""
    block: nnx.State
    qkv: jax.Array  # Attention.fused_qkv()


class Stack(nnx.Module):
    """`len(kinds)` blocks on a stacked "layers" axis, applied with one `lax.scan`."""

    def __init__(self, cfg: BlockConfig, kinds: tuple[str, ...], layout: attention_lib.Layout,
                 *, implementation: str = "sparse", remat: str = "none", scan_unroll: int = 1,
                 rngs: nnx.Rngs):
        if len(kinds) != cfg.depth:
            raise ValueError(f"{len(kinds)} attention kinds for a depth of {cfg.depth}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat={remat!r} must be one of {REMAT_POLICIES}")
        self.kinds = tuple(kinds)
        self.distinct_kinds = tuple(sorted(set(kinds)))
        self.layout = layout
        self.implementation = implementation
        self.remat = remat
        self.scan_unroll = scan_unroll

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)

    def attend_fns(self):
        return [functools.partial(attention_lib.attention, kind=kind, layout=self.layout,
                                  implementation=self.implementation)
                for kind in self.distinct_kinds]

    def _kind_index(self) -> jax.Array:
        return jnp.asarray([self.distinct_kinds.index(k) for k in self.kinds], jnp.int32)

    def _pick(self, fns, index, *args):
        """fns[index](*args): a plain call when the stack has one kind, else `lax.switch`."""
        if len(fns) == 1:
            return fns[0](*args)
        return jax.lax.switch(index, fns, *args)

    def __call__(self, x: jax.Array) -> jax.Array:
        graphdef, state = nnx.split(self.blocks)
        attend_fns = self.attend_fns()

        def layer(x, inputs):
            block_state, index = inputs
            block = nnx.merge(graphdef, block_state)
            x, _ = block(x, lambda q, k, v: (self._pick(attend_fns, index, q, k, v), None))
            return x, None

        x, _ = jax.lax.scan(_remat(layer, self.remat), x, (state, self._kind_index()),
                            unroll=self.scan_unroll)
        return x

    # --- decoding with a key/value cache --------------------------------------------------

    def prefill(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The caption (B, T, d) through every layer: (x, keys, values), keys and values
        [depth, B, T, heads, head_dim]. Caption queries attend causally to the caption in every
        kind of layer, so this is the training forward pass restricted to the caption."""
        graphdef, state = nnx.split(self.blocks)
        mask = attention_lib.dense_mask("causal", attention_lib.Layout(x.shape[1]))

        def layer(x, block_state):
            block = nnx.merge(graphdef, block_state)
            return block(x, lambda q, k, v: (attention_lib.dense_attention(q, k, v, mask),
                                             (k, v)))

        x, (keys, values) = jax.lax.scan(layer, x, state)
        return x, keys, values

    def layer_weights(self) -> tuple[DecodeLayer, ...]:
        """Each layer's parameters as arrays of its own, q, k and v side by side, for `decode`.

        A decode step inside the sampling loop reads them where they are; slicing the stacked
        "layers" axis in the loop instead makes XLA:CPU copy every layer's weights at every
        token, as a scan over the layers does, since it does not hoist the slices out of the
        loop. Computed once per draw, before the loop.
        """
        graphdef, state = nnx.split(self.blocks)
        blocks = [jax.tree.map(lambda x, i=i: x[i], state) for i in range(len(self.kinds))]
        return tuple(DecodeLayer(block, nnx.merge(graphdef, block).attention.fused_qkv())
                     for block in blocks)

    def decode(self, x: jax.Array, cache: tuple[attention_lib.LayerCache, ...], a: jax.Array,
               implementation: str = "sparse", *, weights: tuple[DecodeLayer, ...] | None = None):
        """One image position `a` (x: (B, 1, d)) through every layer: (x, cache).

        cache: one `LayerCache` per layer, its image entry `a` written in place. Each layer
        reads only what its kind lets it see ("sparse": the caption and the layer's window;
        "dense": the whole cache, masked, as a reference).

        With `weights` (`layer_weights()`, computed once outside a loop of decode steps) the
        layers are unrolled, each reading its own weights and cache with its own kind: nothing
        is sliced or switched per layer (a CPU's way; compile time grows with depth). Without,
        the layers are scanned over the stacked weights as in training, so one layer's weights
        at a time are read (on a mesh: gathered; unrolled, XLA gathers every layer's at the
        start of the step and holds them all), and a switch on the layer picks its cache.
        """
        def attend_layer(i, q, k, v, cache):
            layer_cache = attention_lib.cache_entry(cache[i], k, v, a)
            window = attention_lib.decode_window(self.kinds[i], self.layout, a, implementation)
            o = attention_lib.cached_attention(q, layer_cache, window)
            return o, cache[:i] + (layer_cache,) + cache[i + 1:]

        graphdef, state = nnx.split(self.blocks)
        if weights is not None:
            for i, layer in enumerate(weights):
                block = nnx.merge(graphdef, layer.block)
                x, cache = block(x, lambda q, k, v, i=i: attend_layer(i, q, k, v, cache),
                                 layer.qkv)
            return x, cache

        branches = [functools.partial(attend_layer, i) for i in range(len(self.kinds))]

        def layer(carry, inputs):
            x, cache = carry
            block_state, i = inputs
            block = nnx.merge(graphdef, block_state)
            return block(x, lambda q, k, v: jax.lax.switch(i, branches, q, k, v, cache)), None

        (x, cache), _ = jax.lax.scan(layer, (x, cache), (state, jnp.arange(len(self.kinds))))
        return x, cache
