"""The DALL·E transformer: embeddings, segment-restricted logits, the loss, sharding, size."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax import config_lib
from dalle_jax.models import attention as attention_lib
from dalle_jax.models import dalle
from dalle_jax.sharding import logical
from dalle_jax.sharding import mesh as mesh_lib
from dalle_jax.sharding.mesh import build_mesh
from dalle_jax.tasks import dalle as dalle_task

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "dalle_12b_partition_specs.json")


def small_config(**model) -> dalle.DalleConfig:
    """configs/dalle_mini.py shrunk: text 6 + a 4×4 grid, width 32, the row/column/row/conv stack
    (the paper's layers, whatever the mini config uses)."""
    config = config_lib.load("dalle_mini")
    config.text.update(dict(length=6, vocab_size=16))
    config.model.update(dict(grid_size=4, image_vocab_size=24, d_model=32, num_heads=4,
                             head_dim=8, mlp_dim=64, depth=4, conv_kernel=3, layers="paper"))
    config.model.update(model)
    return dalle.dalle_config(config.model, config.text, "float32")


def fast_rngs(seed=0):
    # threefry's normal draws compile slowly on XLA:CPU; rbg keys keep model builds quick.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def small():
    cfg = small_config()
    return cfg, dalle.DALLE(cfg, rngs=fast_rngs())


def captions(cfg, lengths, seed=0):
    """[bos, words..., eos, pad...] rows with the given numbers of words."""
    rng = np.random.default_rng(seed)
    text = np.zeros((len(lengths), cfg.text_length), np.int32)
    for row, n in enumerate(lengths):
        text[row, 0] = 2
        text[row, 1:1 + n] = rng.integers(4, cfg.text_vocab_size, n)
        text[row, 1 + n] = 3
    return text


def image_tokens(cfg, batch, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.image_vocab_size,
                                                (batch, cfg.image_length)).astype(np.int32)


# --- embeddings and logits ----------------------------------------------------------------

def test_every_padded_position_has_its_own_learned_token(small):
    cfg, model = small
    text = captions(cfg, [1, 2])  # pads from position 3 (row 0) and 4 (row 1) on
    embedded = np.asarray(model.embed_text(jnp.asarray(text)))
    pad = np.asarray(model.pad_embed.table[...])
    position = np.asarray(model.text_position.table[...])
    for p in range(4, cfg.text_length):
        np.testing.assert_allclose(embedded[0, p], pad[p] + position[p], rtol=1e-6)
        np.testing.assert_allclose(embedded[1, p], embedded[0, p], rtol=1e-6)
    assert not np.allclose(pad[4], pad[5])  # distinct tokens, not one shared padding token
    word = np.asarray(model.text_embed.table[...])[text[0, 1]]
    np.testing.assert_allclose(embedded[0, 1], word + position[1], rtol=1e-6)
    # A real token with id 0 is impossible (0 is padding), so a pad's table row is unused.


def test_logits_are_restricted_by_segment_and_causal(small):
    cfg, model = small
    text, tokens = captions(cfg, [3, 1]), image_tokens(cfg, 2)
    forward = nnx.jit(lambda m, t, i: m(t, i))
    text_logits, image_logits = forward(model, text, tokens)
    assert text_logits.shape == (2, cfg.text_length - 1, cfg.text_vocab_size)
    assert image_logits.shape == (2, cfg.image_length, cfg.image_vocab_size)

    changed = tokens.copy()
    changed[:, 7] = (changed[:, 7] + 1) % cfg.image_vocab_size
    text_logits2, image_logits2 = forward(model, text, changed)
    np.testing.assert_array_equal(text_logits2, text_logits)  # captions never see the image
    # Image logit j predicts token j from tokens < j: only j > 7 may change.
    np.testing.assert_array_equal(image_logits2[:, :8], image_logits[:, :8])
    assert np.abs(np.asarray(image_logits2[:, 8:] - image_logits[:, 8:])).max() > 1e-6

    recaptioned = text.copy()
    recaptioned[:, 2] = 5 + (recaptioned[:, 2] % 7)
    _, image_logits3 = forward(model, recaptioned, tokens)
    # Every image position sees the whole caption, the first one included.
    assert np.abs(np.asarray(image_logits3[:, 0] - image_logits[:, 0])).max() > 1e-6


def test_sparse_and_dense_models_agree(small):
    cfg, model = small
    dense = nnx.merge(nnx.graphdef(dalle.DALLE(dataclasses.replace(cfg, attention="dense"),
                                               rngs=fast_rngs())), nnx.state(model))
    text, tokens = captions(cfg, [2, 4]), image_tokens(cfg, 2)
    forward = nnx.jit(lambda m, t, i: m(t, i))
    for a, b in zip(forward(model, text, tokens), forward(dense, text, tokens)):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_layers_follow_the_paper_assignment(small):
    cfg, model = small
    assert model.stack.kinds == ("row", "column", "row", "conv")
    assert model.stack.kinds == attention_lib.layer_kinds(cfg.block.depth)
    leading = {x.shape[0] for x in jax.tree.leaves(nnx.state(model.stack, nnx.Param))}
    assert leading == {cfg.block.depth}  # one stacked array per parameter, scanned


def test_causal_layers_use_the_plain_causal_mask_in_every_layer(small):
    """`layers="causal"`: every layer's kind is "causal", whose mask is the brute-force lower
    triangle (each image token sees the caption and every earlier image token), and the
    option changes what the model computes."""
    cfg, _ = small
    causal = dalle.DALLE(dataclasses.replace(cfg, layers="causal"), rngs=fast_rngs())
    assert causal.stack.kinds == ("causal",) * cfg.block.depth
    text, tokens = captions(cfg, [2, 3]), image_tokens(cfg, 2)
    length = cfg.layout.length
    brute = np.tril(np.ones((length, length), bool))
    assert (attention_lib.dense_mask("causal", cfg.layout) == brute).all()
    # A paper-layer model with the same weights computes something else: the layers matter.
    paper = dalle.DALLE(cfg, rngs=fast_rngs())
    nnx.update(paper, nnx.state(causal, nnx.Param))
    forward = nnx.jit(lambda m, t, i: m(t, i))
    _, causal_logits = forward(causal, text, tokens)
    _, paper_logits = forward(paper, text, tokens)
    assert np.abs(np.asarray(causal_logits) - np.asarray(paper_logits)).max() > 1e-3


# --- the loss -----------------------------------------------------------------------------

def test_loss_weighting_matches_a_hand_computation():
    rng = np.random.default_rng(0)
    text = np.array([[2, 7, 9, 3, 0, 0], [2, 5, 3, 0, 0, 0]], np.int32)
    tokens = rng.integers(0, 5, (2, 4)).astype(np.int32)
    text_logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    image_logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    mask = np.array([True, True])

    def nll(logits, target):
        return -(logits[target] - np.log(np.sum(np.exp(logits))))

    text_terms = [nll(text_logits[b, p], text[b, p + 1])
                  for b in range(2) for p in range(5) if text[b, p + 1] != 0]
    image_terms = [nll(image_logits[b, p], tokens[b, p]) for b in range(2) for p in range(4)]
    assert len(text_terms) == 3 + 2  # targets up to and including eos; pads are not targets
    expected = np.mean(text_terms) / 8 + 7 * np.mean(image_terms) / 8

    config = config_lib.load("dalle_mini")
    task = object.__new__(dalle_task.DalleTask)  # only the weighting, no dVAE needed
    task.config = config
    sums = dalle_task.segment_nll_sums(text_logits, image_logits, text, tokens, mask)
    loss, text_loss, image_loss = task._weighted(sums)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(text_loss) == pytest.approx(np.mean(text_terms), rel=1e-5)

    # A masked-out row (padding of a short evaluation batch) changes nothing.
    padded = dalle_task.segment_nll_sums(
        np.concatenate([text_logits, text_logits[:1] * 3]),
        np.concatenate([image_logits, image_logits[:1] * 3]),
        np.concatenate([text, text[:1]]), np.concatenate([tokens, tokens[:1]]),
        np.array([True, True, False]))
    assert float(task._weighted(padded)[0]) == pytest.approx(expected, rel=1e-5)


def test_caption_dropout_empties_whole_captions():
    text = np.tile(np.array([[2, 7, 9, 3, 0]], np.int32), (400, 1))
    dropped = np.asarray(dalle_task.drop_captions(jnp.asarray(text), jax.random.key(0), 0.25))
    empty = np.all(dropped == np.array([2, 3, 0, 0, 0]), axis=1)
    kept = np.all(dropped == text, axis=1)
    assert np.all(empty | kept) and 0.18 < empty.mean() < 0.32


# --- sharding -----------------------------------------------------------------------------

def loss_fn(model, text, tokens):
    text_logits, image_logits = model(text, tokens)
    sums = dalle_task.segment_nll_sums(text_logits, image_logits, text, tokens,
                                       jnp.ones(text.shape[0], bool))
    return sums["text_nll"] / sums["text_count"] + sums["image_nll"] / sums["image_count"]


def sharded_loss_and_grads(cfg, params, text, tokens, mesh_shape):
    config = config_lib.base_config()
    config.mesh.shape = mesh_shape
    mesh, rules = build_mesh(config.mesh), logical.normalize_rules(config_lib.DEFAULT_RULES)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: dalle.DALLE(cfg, rngs=fast_rngs()))
        graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        shardings = logical.state_shardings(abstract_params, mesh, rules)
        batch = logical.batch_sharding(mesh, rules, 2)

        @jax.jit
        def run(params, text, tokens):
            return jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), text, tokens))(
                params)

        placed = jax.device_put(params, shardings)
        loss, grads = run(placed, jax.device_put(text, batch), jax.device_put(tokens, batch))
    return float(loss), jax.device_get(grads), placed


@pytest.fixture(scope="module")
def eight_way():
    """A model whose heads and MLP split 8 ways, a batch of 8, and its one-device loss and
    gradients (computed once for every mesh below)."""
    cfg = small_config(num_heads=8, head_dim=4, mlp_dim=64)
    model = dalle.DALLE(cfg, rngs=fast_rngs())
    text, tokens = captions(cfg, [1, 2, 3, 4, 1, 2, 3, 4]), image_tokens(cfg, 8)
    return cfg, model, text, tokens, _one_device(model, text, tokens)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 1, 8)],
                         ids=["data8", "fsdp8", "data2-fsdp2-tensor2", "tensor8"])
def test_sharded_loss_and_gradients_equal_one_device(eight_way, mesh_shape):
    cfg, model, text, tokens, (expected_loss, expected_grads) = eight_way
    params = nnx.state(model, nnx.Param)
    loss, grads, placed = sharded_loss_and_grads(cfg, params, text, tokens, mesh_shape)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    split = [x for x in jax.tree.leaves(placed) if not x.sharding.is_fully_replicated]
    assert bool(split) == (mesh_shape != (8, 1, 1))  # FSDP / tensor axes really split weights


def _one_device(model, text, tokens):
    graphdef, params = nnx.split(model, nnx.Param)
    loss, grads = jax.jit(jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, p), text, tokens)))(params)
    return float(loss), jax.device_get(grads)


# --- the full-size config -----------------------------------------------------------------

def full_size_abstract_params():
    config = config_lib.load("dalle_12b")
    cfg = dalle.dalle_config(config.model, config.text, config.train.compute_dtype)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: dalle.DALLE(cfg, rngs=fast_rngs()))
    return config, nnx.state(model, nnx.Param)


def test_12b_config_has_12_billion_parameters():
    _, params = full_size_abstract_params()
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert count == pytest.approx(12.0e9, rel=0.01), count


def partition_specs_under_pod_mesh() -> dict[str, str]:
    """Every parameter's PartitionSpec for the 12B config on its 256-chip pod mesh."""
    config, params = full_size_abstract_params()
    shape = mesh_lib.resolve_mesh_shape(tuple(config.mesh.shape), tuple(config.mesh.axes), 256)
    mesh = jax.sharding.AbstractMesh(shape, tuple(config.mesh.axes))
    rules = logical.normalize_rules(config.sharding.rules)
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(params)
    fitted = jax.tree.map(lambda spec, x: str(logical.fit_spec(spec, x.shape, mesh)), specs,
                          params, is_leaf=lambda x: isinstance(x, jax.P))
    flat = {}
    for path, spec in jax.tree_util.tree_leaves_with_path(fitted):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        flat[name.removesuffix("/value")] = spec
    return flat


def write_golden_partition_specs() -> None:
    with open(GOLDEN, "w") as f:
        json.dump(partition_specs_under_pod_mesh(), f, indent=1, sort_keys=True)


def test_12b_partition_specs_match_the_golden_file():
    """The test only reads the file. After an intended change of the sharding, regenerate it
    with `python tests/test_dalle.py --write-golden` and review its diff."""
    specs = partition_specs_under_pod_mesh()
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert specs == golden
    assert specs["stack/blocks/attention/query"] == str(jax.P(None, "fsdp", "tensor", None))


def variant(small, **changes):
    """The `small` model's weights in a model built with other settings (`DalleConfig` fields)."""
    cfg, model = small
    return nnx.merge(nnx.graphdef(dalle.DALLE(dataclasses.replace(cfg, **changes),
                                              rngs=fast_rngs())), nnx.state(model))


def assert_same_loss_and_grads(result, expected):
    (loss, grads), (expected_loss, expected_grads) = result, expected
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def unrematted(small):
    cfg, model = small
    text, tokens = captions(cfg, [2, 3]), image_tokens(cfg, 2)
    return text, tokens, _one_device(model, text, tokens)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_rematerialisation_changes_memory_not_results(small, unrematted, remat):
    text, tokens, expected = unrematted
    assert_same_loss_and_grads(_one_device(variant(small, remat=remat), text, tokens), expected)


def test_unrolling_the_loop_over_layers_changes_speed_not_results(small):
    cfg, _ = small
    text, tokens = captions(cfg, [2, 3]), image_tokens(cfg, 2)
    expected = _one_device(variant(small, scan_unroll=1), text, tokens)
    for scan_unroll in (3, cfg.block.depth):  # uneven (a loop of 3 then 1), and no loop
        assert_same_loss_and_grads(
            _one_device(variant(small, scan_unroll=scan_unroll), text, tokens), expected)


@pytest.mark.parametrize("key, value, match", [
    ("attention", "flash", "config.model.attention='flash'"),
    ("remat", "some", "config.model.remat='some'"),
    ("depth", 0, "config.model.depth=0"),
    ("scan_unroll", 0, "config.model.scan_unroll=0 must be between 1 and config.model.depth=4"),
    ("scan_unroll", 5, "config.model.scan_unroll=5 must be between 1"),
    ("layers", "dense", "config.model.layers='dense' must be one of"),
])
def test_bad_model_config_is_a_one_line_error(key, value, match):
    with pytest.raises(ValueError, match=match):
        cfg = small_config(**{key: value})
        dalle.DALLE(cfg, rngs=fast_rngs())


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--write-golden"]:
        sys.exit("usage: python tests/test_dalle.py --write-golden")
    write_golden_partition_specs()
    print(f"wrote {GOLDEN}")
