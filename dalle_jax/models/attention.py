"""The project's one attention: DALL·E's sparse masks, plain causal (CLIP text) and full (ViT).

A sequence is `text_len` text positions followed by a grid_h×grid_w image in raster order
(`Layout`). Every kind is defined once, as a boolean mask over (query, key) input positions
(`dense_mask`); `dense_attention` applies such a mask to full L×L scores and is the reference.
`sparse_attention` gives the same result without computing the score blocks the DALL·E masks
remove: text queries attend causally to the text; image queries attend to all text keys and
to a window of image keys shared by a group of queries (a block of the raster and the grid_w
positions before it for "row"; its own column, made contiguous by a transpose, for "column";
two image rows and the conv_kernel//2 rows above for "conv"), with ONE softmax over text and
window scores together. Its work grows like n·(text_len + window) instead of n²; on CPU at the
paper's 256 + 32×32 it runs forward + backward 2.5-4× faster than the dense-masked reference
(benchmarks/sparse_attention.py). "causal" and "full" have nothing to skip and use the dense path;
the transformer can also use "causal" in every layer (`layer_kinds(depth, "causal")`).

    kinds = layer_kinds(64)                      # ("row", "column", "row", "row", ..., "conv")
    out = attention(q, k, v, kinds[i], Layout(256, 32, 32))   # q, k, v: [batch, L, heads, dim]
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("causal", "full", "row", "column", "conv")
SPARSE_KINDS = ("row", "column", "conv")
# The transformer's choices of kinds over its layers (`layer_kinds`).
LAYER_PATTERNS = ("paper", "causal")
DECODE_KINDS = SPARSE_KINDS + ("causal",)  # the kinds of the transformer's image queries
# Group sizes of the sparse path, measured on CPU at the paper's layout (benchmarks/
# sparse_attention.py): smaller groups compute fewer masked scores but copy more key windows
# (each key lands in several) and make smaller matmuls; at 32x32, 32 and two rows won.
# Read when a (kind, layout) is first planned.
ROW_BLOCK = 32  # "row": queries per block; each block sees ROW_BLOCK + grid_w keys.
CONV_ROWS = 2   # "conv": image rows per query block; it sees conv_kernel//2 + CONV_ROWS rows.
_MASKED = float(np.finfo(np.float32).min)  # Finite, so a fully masked row gives no NaN.


def _as_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"Layout.{name} must be an int, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where text and image sit in the stream; hashable, so it can be a static jit argument."""
    text_len: int
    grid_h: int = 0
    grid_w: int = 0
    conv_kernel: int = 11

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _as_int(field.name, getattr(self, field.name)))
        if self.text_len < 1:
            raise ValueError(f"Layout.text_len must be >= 1, got {self.text_len}")
        for name in ("grid_h", "grid_w"):
            if getattr(self, name) < 0:
                raise ValueError(f"Layout.{name} must be >= 0, got {getattr(self, name)}")
        if (self.grid_h == 0) != (self.grid_w == 0):
            raise ValueError(f"Layout.grid_h and grid_w must both be 0 (no image) or both "
                             f"positive, got {self.grid_h}x{self.grid_w}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"Layout.conv_kernel must be a positive odd int (the neighbourhood "
                             f"is centred on the query), got {self.conv_kernel}")

    @property
    def image_len(self) -> int:
        return self.grid_h * self.grid_w

    @property
    def length(self) -> int:
        return self.text_len + self.image_len


def layer_kinds(depth: int, layers: str = "paper") -> tuple[str, ...]:
    """The attention kind of layers 1..depth.

    "paper": the paper's assignment, last "conv", else "column" if (i-2)%4==0; "causal": every
    image query sees every earlier image position, in every layer (for small grids, where the
    sparse patterns save little and a few layers must still relate the whole image).
    """
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if layers not in LAYER_PATTERNS:
        raise ValueError(f"layers={layers!r} must be one of {LAYER_PATTERNS}")
    if layers == "causal":
        return ("causal",) * depth
    return tuple("conv" if i == depth else "column" if (i - 2) % 4 == 0 else "row"
                 for i in range(1, depth + 1))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"attention kind {kind!r} is not one of {KINDS}")


def _image_rule(kind: str, a, b, layout: Layout):
    """Whether image query a sees image key b (raster indices, broadcastable numpy arrays).

    The single definition of the sparse patterns: `dense_mask` and the sparse path's window
    masks both call it, so they cannot disagree. Callers mask keys outside the grid themselves.
    """
    w, radius = layout.grid_w, layout.conv_kernel // 2
    causal = b <= a
    if kind == "causal":
        return causal
    if kind == "row":
        return causal & (a - b <= w)
    if kind == "column":
        return causal & ((a - b) % w == 0)
    # Builtin abs: works on numpy arrays here and on traced positions when decoding.
    return causal & (abs(a // w - b // w) <= radius) & (abs(a % w - b % w) <= radius)


def dense_mask(kind: str, layout: Layout) -> np.ndarray:
    """bool [L, L] (query, key): which keys each input position may attend to."""
    _check_kind(kind)
    n = layout.length
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    if kind == "full":
        return np.ones((n, n), bool)
    causal = j <= i
    if kind == "causal" or layout.image_len == 0:
        return causal
    t = layout.text_len
    image = (j >= t) & _image_rule(kind, i - t, j - t, layout)
    return np.where(i < t, causal, (j < t) | image)


def kept_score_count(kind: str, layout: Layout) -> int:
    """(query, key) pairs the mask keeps, i.e. dense_mask(kind, layout).sum(), in O(L) work.

    The score FLOPs a layer really needs (for FLOP accounting), not what an implementation does.
    """
    _check_kind(kind)
    n, t, m = layout.length, layout.text_len, layout.image_len
    if kind == "full":
        return n * n
    if kind == "causal" or m == 0:
        return n * (n + 1) // 2
    a = np.arange(m)
    w, radius = layout.grid_w, layout.conv_kernel // 2
    if kind == "row":
        local = np.minimum(a, w) + 1
    elif kind == "column":
        local = a // w + 1
    else:
        r, c = a // w, a % w
        above = np.minimum(r, radius)
        width = np.minimum(c + radius, w - 1) - np.maximum(c - radius, 0) + 1
        local = above * width + np.minimum(c, radius) + 1
    return t * (t + 1) // 2 + m * t + int(local.sum())


def dense_attention(q, k, v, mask=None):
    """Reference attention over full [L, L] scores; `mask` bool, broadcastable to [.., q, k].

    q, k, v: [batch, length, heads, head_dim]. Scores and softmax in float32, output in q.dtype.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, _MASKED)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def _pad_to(x, size: int):
    """x [..., m, d] -> [..., size, d], zeros after."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, size - x.shape[-2]), (0, 0)])


def _band_windows(x, block: int, before: int):
    """x [..., G·block, d] -> [..., G, before + block, d]: each block with the positions ahead.

    Built from shifted copies of the blocked array (zeros before the start): a few static
    slices and one concatenation, which measured faster on CPU than a gather of the windows.
    """
    groups, ahead = x.shape[-2] // block, -(-before // block)
    blocks = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(ahead * block, 0), (0, 0)])
    blocks = blocks.reshape(x.shape[:-2] + (groups + ahead, block, x.shape[-1]))
    windows = jnp.concatenate([blocks[..., j:j + groups, :, :] for j in range(ahead + 1)], -2)
    return windows[..., ahead * block - before:, :]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """How image states [..., n, d] are cut into G query groups of s and their K-key windows.

    queries: -> [..., G, s, d]; windows: -> [..., G, K, d]; ungroup: [..., G, s, d] ->
    [..., n, d] (raster order); mask: bool [G, s, K], static.
    """
    queries: Callable
    windows: Callable
    ungroup: Callable
    mask: np.ndarray


def _window_mask(kind: str, layout: Layout, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[G, s, K] from the raster positions of each group's queries a [G, s] and keys b [G, K]."""
    inside = (b >= 0) & (b < layout.image_len)  # Windows reach before the image's start.
    return inside[:, None, :] & _image_rule(kind, a[:, :, None], b[:, None, :], layout)


def _raster_plan(kind: str, layout: Layout, block: int, before: int) -> _Plan:
    """Blocks of `block` consecutive raster positions, each seeing `before` positions ahead too.

    "row": blocks of ROW_BLOCK with grid_w before. "conv": blocks of CONV_ROWS image rows
    with conv_kernel//2 rows before (whole rows: the columns beyond the kernel are masked,
    which measured cheaper than cutting column windows).
    """
    n = layout.image_len
    block = min(block, n)
    groups = -(-n // block)
    before = min(before, (groups - 1) * block)
    a = np.arange(groups)[:, None] * block + np.arange(block)
    b = np.arange(groups)[:, None] * block - before + np.arange(before + block)
    padded = lambda x: _pad_to(x, groups * block)
    return _Plan(
        queries=lambda x: padded(x).reshape(x.shape[:-2] + (groups, block, x.shape[-1])),
        windows=lambda x: _band_windows(padded(x), block, before),
        ungroup=lambda y: y.reshape(y.shape[:-3] + (groups * block, y.shape[-1]))[..., :n, :],
        mask=_window_mask(kind, layout, a, b))


def _column_plan(layout: Layout) -> _Plan:
    """Column-major image: each column is one contiguous causal group of grid_h positions."""
    h, w = layout.grid_h, layout.grid_w
    columns = lambda x: jnp.swapaxes(x.reshape(x.shape[:-2] + (h, w, x.shape[-1])), -3, -2)
    positions = np.arange(h)[None, :] * w + np.arange(w)[:, None]
    return _Plan(
        queries=columns, windows=columns,
        ungroup=lambda y: jnp.swapaxes(y, -3, -2).reshape(y.shape[:-3] + (h * w, y.shape[-1])),
        mask=_window_mask("column", layout, positions, positions))


@functools.lru_cache(maxsize=None)
def _plan(kind: str, layout: Layout) -> _Plan:
    if kind == "column":
        return _column_plan(layout)
    if kind == "row":
        return _raster_plan(kind, layout, ROW_BLOCK, layout.grid_w)
    return _raster_plan(kind, layout, CONV_ROWS * layout.grid_w,
                        layout.conv_kernel // 2 * layout.grid_w)


def computed_score_count(kind: str, layout: Layout, implementation: str = "sparse") -> int:
    """(query, key) scores an implementation actually computes, masked ones included."""
    _check_kind(kind)
    if implementation == "dense" or kind not in SPARSE_KINDS or layout.image_len == 0:
        return layout.length ** 2
    groups, s, keys = _plan(kind, layout).mask.shape
    return layout.text_len ** 2 + groups * s * (layout.text_len + keys)


def _text_and_window_attention(q, k_text, v_text, k_win, v_win, mask):
    """Grouped queries [B,h,G,s,d] over all text keys [B,h,T,d] plus their window [B,h,G,K,d].

    The two score arrays are concatenated so ONE softmax normalises text and image keys
    together, as the paper's masks do. (Sharing the max and normaliser across the two parts
    without concatenating measured no faster on CPU.)
    """
    f32 = jnp.float32
    scale = 1 / math.sqrt(q.shape[-1])
    text = jnp.einsum("bhgsd,bhtd->bhgst", q, k_text, preferred_element_type=f32) * scale
    local = jnp.einsum("bhgsd,bhgkd->bhgsk", q, k_win, preferred_element_type=f32) * scale
    local = jnp.where(mask, local, _MASKED)
    weights = jax.nn.softmax(jnp.concatenate([text, local], axis=-1), axis=-1)
    text, local = jnp.split(weights.astype(v_text.dtype), [text.shape[-1]], axis=-1)
    out = (jnp.einsum("bhgst,bhtd->bhgsd", text, v_text, preferred_element_type=f32)
           + jnp.einsum("bhgsk,bhgkd->bhgsd", local, v_win, preferred_element_type=f32))
    return out.astype(q.dtype)


def sparse_attention(q, k, v, kind: str, layout: Layout):
    """Same result as dense_attention(q, k, v, dense_mask(kind, layout)), with n·(T + window) work.

    "causal" and "full" have no blocks to skip and simply call dense_attention.
    """
    _check_shapes(q, k, v, kind, layout)
    if kind == "full":
        return dense_attention(q, k, v)
    t = layout.text_len
    if kind == "causal" or layout.image_len == 0:
        return dense_attention(q, k, v, dense_mask("causal", layout))
    text = dense_attention(q[:, :t], k[:, :t], v[:, :t], dense_mask("causal", Layout(t)))
    plan = _plan(kind, layout)
    # Heads-major [B, h, n, d], so every matmul below is batched over leading axes, untransposed.
    q_image, k_image, v_image = (jnp.swapaxes(x[:, t:], 1, 2) for x in (q, k, v))
    k_text, v_text = (jnp.swapaxes(x[:, :t], 1, 2) for x in (k, v))
    image = _text_and_window_attention(plan.queries(q_image), k_text, v_text,
                                       plan.windows(k_image), plan.windows(v_image), plan.mask)
    return jnp.concatenate([text, jnp.swapaxes(plan.ungroup(image), 1, 2)], axis=1)


def _check_shapes(q, k, v, kind: str, layout: Layout) -> None:
    _check_kind(kind)
    if not q.shape == k.shape == v.shape or q.ndim != 4 or q.shape[1] != layout.length:
        raise ValueError(f"q, k, v must be [batch, {layout.length}, heads, head_dim] for {layout}, "
                         f"got {q.shape}, {k.shape}, {v.shape}")


def attention(q, k, v, kind: str, layout: Layout, implementation: str = "sparse"):
    """Attention of `kind` over `layout`: "sparse" (efficient) or "dense" (masked reference)."""
    if implementation == "sparse":
        return sparse_attention(q, k, v, kind, layout)
    if implementation == "dense":
        _check_shapes(q, k, v, kind, layout)
        return dense_attention(q, k, v, None if kind == "full" else dense_mask(kind, layout))
    raise ValueError(f"attention implementation {implementation!r} is not 'sparse' or 'dense'")


# --- decoding: one image query against a key/value cache --------------------------------

class LayerCache(NamedTuple):
    """One layer's keys and values, heads-major so attention reads them without a transpose:
    the caption's [B, heads, text_len, head_dim], written once by the prefill, and the image's
    [B, heads, image_len, head_dim], one position written per decode step."""
    text_keys: jax.Array
    text_values: jax.Array
    image_keys: jax.Array
    image_values: jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeWindow:
    """The image cache entries a decode query reads: one `dynamic_slice` of the image
    positions viewed as `grid` ((n,) in raster order or (grid_h, grid_w)), at `start` (traced,
    already clamped inside the grid, so it is where the slice really reads) of static `size`.

    positions: int32 [K] raster positions read; valid: bool [K], the mask row of the query.
    """
    grid: tuple[int, ...]
    start: tuple
    size: tuple[int, ...]
    positions: jax.Array
    valid: jax.Array

    def read(self, x):
        """x [B, heads, image_len, head_dim] -> [B, heads, K, head_dim]."""
        lead, depth = x.shape[:2], x.shape[-1]
        view = x.reshape(lead + self.grid + (depth,))
        zero = jnp.int32(0)
        window = jax.lax.dynamic_slice(view, (zero, zero, *self.start, zero),
                                       lead + self.size + (depth,))
        return window.reshape(lead + (-1, depth))


def _clamped_start(first, size: int, extent: int):
    """Where a slice of `size` that should begin at `first` begins once kept inside `extent`
    (what `dynamic_slice` would do on its own; done here so the positions read are known)."""
    return jnp.clip(first, 0, extent - size).astype(jnp.int32)


def decode_window(kind: str, layout: Layout, a, implementation: str = "sparse") -> DecodeWindow:
    """The image positions image query `a` (traced) reads from the cache when decoding.

    Static in size whatever `a` is, so a decode step compiles once and costs the same at every
    position, and one rectangle of the grid (a slice, not a gather): "row" reads a's row and
    the one above (the grid_w + 1 positions ending at a lie in them); "column" a's column;
    "conv" the conv_kernel//2 + 1 rows ending at a's row, conv_kernel columns wide around a's
    column; "causal" layers, and every layer with implementation "dense" (the reference), read
    the whole image with the mask's row. Every query also reads all text positions. Validity
    always comes from `_image_rule`, the patterns' single definition.
    """
    if kind not in DECODE_KINDS:
        raise ValueError(f"decoding reads image keys of one of {DECODE_KINDS}, not {kind!r}")
    n, h, w, radius = layout.image_len, layout.grid_h, layout.grid_w, layout.conv_kernel // 2
    a = jnp.asarray(a, jnp.int32)
    if implementation == "dense" or kind == "causal":
        grid, start, size = (n,), (jnp.int32(0),), (n,)
    elif kind == "row":
        # a's row and the one above, whole: a superset of the grid_w + 1 positions ending at
        # a, read through the same 2-d view as the other kinds. (A 1-d slice of the grid_w + 1
        # positions made XLA:CPU fuse the read into the write of a's entry, reading the old
        # cache, and copy the layer's whole cache at every token to keep it.)
        size = (min(2, h), w)
        grid, start = (h, w), (_clamped_start(a // w - 1, size[0], h), jnp.int32(0))
    elif kind == "column":
        grid, start, size = (h, w), (jnp.int32(0), a % w), (h, 1)
    else:
        size = (min(radius + 1, h), min(2 * radius + 1, w))
        grid = (h, w)
        start = (_clamped_start(a // w - radius, size[0], h),
                 _clamped_start(a % w - radius, size[1], w))
    if len(grid) == 1:
        positions = start[0] + jnp.arange(size[0])
    else:
        rows, cols = (s + jnp.arange(k) for s, k in zip(start, size))
        positions = (rows[:, None] * w + cols[None, :]).reshape(-1)
    positions = positions.astype(jnp.int32)
    return DecodeWindow(grid, start, size, positions, _image_rule(kind, a, positions, layout))


def decode_read_length(kind: str, layout: Layout, implementation: str = "sparse") -> int:
    """Cache positions (text + window) one decode query of a `kind` layer reads."""
    return layout.text_len + math.prod(decode_window(kind, layout, 0, implementation).size)


def cache_entry(cache: LayerCache, k, v, a) -> LayerCache:
    """`cache` with image position `a`'s key and value (each [B, 1, heads, head_dim]) written,
    in place when the cache is a loop carry or a donated argument."""
    at = (0, 0, a, 0)
    keys, values = (jax.lax.dynamic_update_slice(c, jnp.swapaxes(x, 1, 2).astype(c.dtype), at)
                    for c, x in ((cache.image_keys, k), (cache.image_values, v)))
    return cache._replace(image_keys=keys, image_values=values)


def cached_attention(q, cache: LayerCache, window: DecodeWindow):
    """One query per example, q [B, 1, heads, head_dim], over all text entries of `cache` and
    its image entries in `window` (the query's own entry written): the sparse path's text and
    window attention with one group of one query. Scores and softmax in float32, output
    [B, 1, heads, head_dim]."""
    k_window, v_window = (window.read(c)[:, :, None] for c in (cache.image_keys,
                                                                cache.image_values))
    query = jnp.swapaxes(q, 1, 2)[:, :, None]  # [B, heads, 1 group, 1 query, head_dim]
    out = _text_and_window_attention(query, cache.text_keys, cache.text_values, k_window,
                                     v_window, window.valid[None, None, :])
    return jnp.swapaxes(out[:, :, 0], 1, 2)
