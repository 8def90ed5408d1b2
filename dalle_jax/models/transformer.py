"""The one transformer block, and a stack of them scanned over depth.

The DALL·E transformer and CLIP's text encoder both use `Stack`; they differ only in the
attention kind of each layer ("row"/"column"/"conv" for DALL·E, "causal" for CLIP's text,
"full" for a ViT) and in the `Layout` of the sequence.

Layers are stacked on a leading "layers" axis and applied with `lax.scan`, so compile time does
not grow with depth. Layers of different kinds share one scan body: the kind of each layer is
an index into the kinds the stack uses and `lax.switch` picks the attention, which only changes
which keys a query sees (the projections are the same).
"""
from __future__ import annotations

import dataclasses
import functools
import math

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

    def project(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (B, L, d) -> q, k, v, each (B, L, heads, head_dim)."""
        x = x.astype(self.dtype)
        names = ("batch", "length", "heads", "kv")
        return tuple(layers.constrain(jnp.einsum("bld,dhk->blhk", x, w[...].astype(self.dtype)),
                                      names)
                     for w in (self.query, self.key, self.value))

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

    def __call__(self, x: jax.Array, attend) -> jax.Array:
        """`attend(q, k, v) -> o` is the layer's attention pattern (see `Stack`)."""
        q, k, v = self.attention.project(self.attention_norm(x))
        x = x + self.attention.output(attend(q, k, v)).astype(x.dtype)
        return layers.constrain(x + self.mlp(self.mlp_norm(x)).astype(x.dtype), ACT)


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    if policy == "save_dots":
        return jax.checkpoint(
            fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"config.model.remat={policy!r} must be one of {REMAT_POLICIES}")


class Stack(nnx.Module):
    """`len(kinds)` blocks on a stacked "layers" axis, applied with one `lax.scan`."""

    def __init__(self, cfg: BlockConfig, kinds: tuple[str, ...], layout: attention_lib.Layout,
                 *, implementation: str = "sparse", remat: str = "none", rngs: nnx.Rngs):
        if len(kinds) != cfg.depth:
            raise ValueError(f"{len(kinds)} attention kinds for a depth of {cfg.depth}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"config.model.remat={remat!r} must be one of {REMAT_POLICIES}")
        self.kinds = tuple(kinds)
        self.distinct_kinds = tuple(sorted(set(kinds)))
        self.layout = layout
        self.implementation = implementation
        self.remat = remat

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)

    def attend_fns(self):
        return [functools.partial(attention_lib.attention, kind=kind, layout=self.layout,
                                  implementation=self.implementation)
                for kind in self.distinct_kinds]

    def __call__(self, x: jax.Array) -> jax.Array:
        graphdef, state = nnx.split(self.blocks)
        attend_fns = self.attend_fns()
        kind_index = jnp.asarray([self.distinct_kinds.index(k) for k in self.kinds], jnp.int32)

        def layer(x, inputs):
            block_state, index = inputs
            block = nnx.merge(graphdef, block_state)
            if len(attend_fns) == 1:
                attend = attend_fns[0]
            else:
                def attend(q, k, v):
                    return jax.lax.switch(index, attend_fns, q, k, v)
            return block(x, attend), None

        x, _ = jax.lax.scan(_remat(layer, self.remat), x, (state, kind_index))
        return x
