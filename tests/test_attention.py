"""Attention masks against a brute-force definition; the sparse path against the dense one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.models import attention as attn
from dalle_jax.models.attention import Layout

LAYOUTS = [
    Layout(3, 4, 4),
    Layout(5, 3, 6),
    Layout(1, 1, 1),
    Layout(2, 5, 5, conv_kernel=3),
    Layout(2, 5, 5, conv_kernel=11),  # The kernel is larger than the grid.
    Layout(2, 4, 1),                  # One column.
    Layout(3, 1, 5),                  # One row.
    Layout(2, 6, 40, conv_kernel=5),  # Wider than a row block.
    Layout(4),                        # Text only.
]


def brute_force_mask(kind, layout):
    """The masks as the paper describes them, one (query, key) pair at a time."""
    t, w, radius = layout.text_len, layout.grid_w, layout.conv_kernel // 2
    mask = np.zeros((layout.length, layout.length), bool)
    for i in range(layout.length):
        for j in range(layout.length):
            if kind == "full":
                keep = True
            elif kind == "causal" or i < t:
                keep = j <= i
            elif j < t:
                keep = True  # Image queries see every text position.
            else:
                (q_row, q_col), (k_row, k_col) = divmod(i - t, w), divmod(j - t, w)
                before = (k_row, k_col) <= (q_row, q_col)  # Raster order, itself included.
                if kind == "row":
                    keep = before and (q_row * w + q_col) - (k_row * w + k_col) <= w
                elif kind == "column":
                    keep = before and k_col == q_col
                else:
                    keep = before and abs(q_row - k_row) <= radius and abs(q_col - k_col) <= radius
            mask[i, j] = keep
    return mask


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_dense_mask_and_kept_count_match_brute_force(layout):
    for kind in attn.KINDS:
        expected = brute_force_mask(kind, layout)
        np.testing.assert_array_equal(attn.dense_mask(kind, layout), expected, err_msg=kind)
        assert attn.kept_score_count(kind, layout) == expected.sum(), kind


def _random_qkv(layout, seed=0, batch=2, heads=2, dim=8):
    rng = np.random.default_rng(seed)
    shape = (batch, layout.length, heads, dim)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(4)]


def _assert_sparse_matches_dense(kind, layout):
    q, k, v, weights = _random_qkv(layout)

    def outputs_and_grads(implementation):
        loss = lambda q, k, v: jnp.sum(weights * attn.attention(q, k, v, kind, layout,
                                                                implementation))
        return (attn.attention(q, k, v, kind, layout, implementation),
                jax.grad(loss, argnums=(0, 1, 2))(q, k, v))

    both = jax.jit(lambda: (outputs_and_grads("sparse"), outputs_and_grads("dense")))()
    (out, grads), (ref_out, ref_grads) = both
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5, err_msg=f"{kind} forward")
    for name, g, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-5, err_msg=f"{kind} d/d{name}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("kind", attn.KINDS)
def test_sparse_matches_dense_values_and_gradients(kind, layout):
    _assert_sparse_matches_dense(kind, layout)


@pytest.mark.parametrize("kind", attn.SPARSE_KINDS)
def test_sparse_matches_dense_with_small_groups(kind, monkeypatch):
    """Row blocks shorter than a row, and blocks that do not divide the image."""
    monkeypatch.setattr(attn, "ROW_BLOCK", 3)
    monkeypatch.setattr(attn, "CONV_ROWS", 2)
    attn._plan.cache_clear()
    try:
        for layout in (Layout(3, 5, 7, conv_kernel=3), Layout(1, 7, 4, conv_kernel=5)):
            _assert_sparse_matches_dense(kind, layout)
    finally:
        attn._plan.cache_clear()


def test_sparse_skips_masked_work_and_keeps_dtype():
    layout = Layout(256, 32, 32)
    for kind in attn.SPARSE_KINDS:  # Close to the scores the mask keeps, far from L².
        computed = attn.computed_score_count(kind, layout)
        assert computed < 2 * attn.kept_score_count(kind, layout)
        assert computed < 0.4 * layout.length ** 2
    layout = Layout(2, 3, 3)
    q = jnp.zeros((1, layout.length, 2, 4), jnp.bfloat16)
    assert attn.attention(q, q, q, "conv", layout).dtype == jnp.bfloat16


@pytest.mark.parametrize("depth", [1, 4, 8, 64])
def test_layer_kinds_follow_the_paper(depth):
    kinds = attn.layer_kinds(depth)
    assert len(kinds) == depth and kinds[-1] == "conv"
    for i, kind in enumerate(kinds[:-1], start=1):
        assert kind == ("column" if (i - 2) % 4 == 0 else "row"), i
    if depth >= 5:
        assert kinds[:4] == ("row", "column", "row", "row")


def test_causal_layers_and_an_unknown_pattern():
    assert attn.layer_kinds(3, "causal") == ("causal",) * 3
    assert attn.layer_kinds(3, "paper") == attn.layer_kinds(3)
    with pytest.raises(ValueError, match="layers='dense' must be one of"):
        attn.layer_kinds(3, "dense")


@pytest.mark.parametrize("layout", [Layout(3, 4, 5, conv_kernel=3),
                                    Layout(2, 3, 4, conv_kernel=11)],  # kernel wider than the grid
                         ids=["3x3 kernel", "kernel beyond the grid"])
@pytest.mark.parametrize("kind", attn.DECODE_KINDS)
def test_a_decode_window_reads_the_mask_row_of_the_query(kind, layout):
    """The image positions a decode step slices out of the cache, with their validity, plus
    every text position, select exactly the keys the layer's mask gives the query (what the
    training forward sees); and the slice reads the positions the window names."""
    mask = attn.dense_mask(kind, layout)
    t, n = layout.text_len, layout.image_len
    raster = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32)[None, None, :, None], (1, 1, n, 2))
    for implementation in ("sparse", "dense"):
        for a in range(n):
            window = attn.decode_window(kind, layout, a, implementation)
            positions = np.asarray(window.positions)
            np.testing.assert_array_equal(np.asarray(window.read(raster))[0, 0, :, 0], positions)
            seen = np.zeros(layout.length, bool)
            seen[:t] = True
            seen[t + positions[np.asarray(window.valid)]] = True
            np.testing.assert_array_equal(seen, mask[t + a], err_msg=f"{implementation} {a}")
            assert len(positions) + t == attn.decode_read_length(kind, layout, implementation)


@pytest.mark.parametrize("kwargs, field", [
    (dict(text_len=0), "text_len"),
    (dict(text_len=4, grid_h=-1, grid_w=-1), "grid_h"),
    (dict(text_len=4, grid_h=3, grid_w=0), "grid_h"),
    (dict(text_len=4, grid_h=2, grid_w=2, conv_kernel=4), "conv_kernel"),
    (dict(text_len=4, grid_h=2, grid_w=2, conv_kernel=0), "conv_kernel"),
    (dict(text_len=2.0), "text_len"),
    (dict(text_len=True), "text_len"),
])
def test_bad_layouts_give_one_line_errors(kwargs, field):
    with pytest.raises(ValueError, match=field) as error:
        Layout(**kwargs)
    assert "\n" not in str(error.value)


def test_layout_is_hashable_and_bad_calls_are_refused():
    assert hash(Layout(3, 4, 4)) == hash(Layout(3, 4, 4)) and Layout(3, 4, 4).length == 19
    q = jnp.zeros((1, 19, 1, 4))
    with pytest.raises(ValueError, match="kind"):
        attn.attention(q, q, q, "diagonal", Layout(3, 4, 4))
    with pytest.raises(ValueError, match="implementation"):
        attn.attention(q, q, q, "row", Layout(3, 4, 4), implementation="flash")
    with pytest.raises(ValueError, match="19"):
        attn.attention(q[:, :18], q[:, :18], q[:, :18], "row", Layout(3, 4, 4))
