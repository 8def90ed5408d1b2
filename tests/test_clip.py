"""CLIP: the global-batch contrastive loss under sharding, the temperature, end-token features,
retrieval metrics, config errors, and a short training run through the one loop."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax import config_lib
from dalle_jax import workdir as workdir_lib
from dalle_jax.data.examples import load_examples
from dalle_jax.evaluation import retrieval
from dalle_jax.models import clip
from dalle_jax.models.scorer import ClipScorer
from dalle_jax.sharding import logical
from dalle_jax.sharding.mesh import build_mesh
from dalle_jax.tasks import clip as clip_task
from dalle_jax.tasks import get_task, zero_shot
from dalle_jax.training import metrics as metrics_lib


def small_config(**model):
    """configs/clip_mini.py shrunk: 16 px images in 4×4 patches, captions of 8 tokens."""
    config = config_lib.load("clip_mini")
    config.data.image_size = 16
    config.text.update(dict(length=8, vocab_size=16))
    config.model.update(dict(patch_size=4, image_width=32, image_depth=2, image_heads=4,
                             image_mlp_ratio=2, text_width=32, text_depth=2, text_heads=4,
                             text_mlp_ratio=2, embed_dim=16))
    config.model.update(model)
    return config


def fast_rngs(seed=0):
    # threefry's normal draws compile slowly on XLA:CPU; rbg keys keep model builds quick.
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def small():
    config = small_config()
    task = get_task(config)
    return config, task, task.build_model(fast_rngs())


def captions(config, lengths, seed=0):
    """[bos, words..., eos, pad...] rows with the given numbers of words."""
    rng = np.random.default_rng(seed)
    text = np.zeros((len(lengths), config.text.length), np.int32)
    for row, n in enumerate(lengths):
        text[row, 0] = 2
        text[row, 1:1 + n] = rng.integers(4, config.text.vocab_size, n)
        text[row, 1 + n] = 3
    return text


def images(config, batch, seed=0):
    size = config.data.image_size
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3)).astype(np.uint8)


def unit_rows(rng, n, dim):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# --- the global-batch loss under sharding -------------------------------------------------

def task_loss(task, graphdef, params, batch):
    return task.loss(nnx.merge(graphdef, params), batch, None, None)[0]


def sharded_loss_and_grads(task, config, params, batch, mesh_shape):
    config = config.copy_and_resolve_references()
    config.mesh.shape = mesh_shape
    mesh, rules = build_mesh(config.mesh), logical.normalize_rules(config_lib.DEFAULT_RULES)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: task.build_model(fast_rngs())))
        shardings = logical.state_shardings(abstract, mesh, rules)
        placed = jax.device_put(params, shardings)
        sharded = {k: jax.device_put(v, logical.batch_sharding(mesh, rules, v.ndim))
                   for k, v in batch.items()}
        for value in sharded.values():  # the batch really is split over the data axes
            assert value.sharding.spec[0] == ("data", "fsdp")
            assert len(value.addressable_shards) == 8
            assert value.addressable_shards[0].data.shape[0] == len(batch["mask"]) // (
                mesh_shape[0] * mesh_shape[1])
        step = jax.jit(jax.value_and_grad(lambda p, b: task_loss(task, graphdef, p, b)))
        compiled = step.lower(placed, sharded).compile()
        loss, grads = compiled(placed, sharded)
    return float(loss), jax.device_get(grads), placed, compiled.as_text()


@pytest.fixture(scope="module")
def one_device(small):
    """A global batch of 16, and its loss, gradients and embeddings on one device."""
    config, task, model = small
    batch = {"image": images(config, 16),
             "text": captions(config, [1, 2, 3, 4, 5, 6] * 2 + [1] * 4), "mask": np.ones(16, bool)}
    graphdef, params = nnx.split(model)

    def loss_and_embeddings(p):
        m = nnx.merge(graphdef, p)
        return task.loss(m, batch, None, None)[0], m(batch["image"], batch["text"])

    (loss, embeddings), grads = jax.jit(jax.value_and_grad(loss_and_embeddings, has_aux=True))(
        params)
    return batch, float(loss), jax.device_get(grads), embeddings


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)], ids=["data8", "data2-fsdp2-tensor2"])
def test_sharded_contrastive_loss_and_gradients_equal_one_device(small, one_device, mesh_shape):
    config, task, model = small
    batch, expected_loss, expected_grads, _ = one_device
    loss, grads, placed, hlo = sharded_loss_and_grads(task, config, nnx.state(model), batch,
                                                      mesh_shape)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert "all-gather" in hlo  # each device's embeddings reach every other device
    split = [x for x in jax.tree.leaves(placed) if not x.sharding.is_fully_replicated]
    assert bool(split) == (mesh_shape != (8, 1, 1))  # FSDP / tensor axes really split weights


def test_the_global_loss_is_not_a_mean_of_per_device_losses(one_device):
    """What the sharded test rules out: contrasting only within each device's 2 examples (a
    per-device loss without the gather) gives a different, much smaller loss."""
    _, loss, _, (image_emb, text_emb, scale) = one_device
    local = np.mean([float(clip_task.contrastive_loss(image_emb[i:i + 2], text_emb[i:i + 2],
                                                      scale)[0]) for i in range(0, 16, 2)])
    assert local < 0.5 * loss


# --- the temperature ----------------------------------------------------------------------

def test_temperature_starts_at_1_over_0_07_and_is_clipped_at_100(small):
    _, _, model = small
    assert float(model.logit_scale[...]) == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert float(model.logit_scale_value()) == pytest.approx(1 / 0.07, rel=1e-5)
    initial = model.logit_scale[...]
    try:
        model.logit_scale[...] = jnp.asarray(math.log(100.0) + 1.5)
        assert float(model.logit_scale_value()) == pytest.approx(100.0, rel=1e-6)
    finally:
        model.logit_scale[...] = initial
    # Above the clip, the loss no longer moves the temperature parameter.
    rng = np.random.default_rng(0)
    emb_i, emb_t = unit_rows(rng, 6, 8), unit_rows(rng, 6, 8)

    def loss_of(t):
        return clip_task.contrastive_loss(emb_i, emb_t, jnp.exp(jnp.minimum(
            t, clip.LOGIT_SCALE_MAX)))[0]
    grad = jax.jit(jax.vmap(jax.grad(loss_of)))(
        jnp.asarray([math.log(100.0) + 1.5, math.log(1 / 0.07)], jnp.float32))
    assert float(grad[0]) == 0.0 and float(grad[1]) != 0.0


# --- the loss and the metrics -------------------------------------------------------------

def test_symmetric_loss_matches_a_hand_computation():
    rng = np.random.default_rng(1)
    emb_i, emb_t, scale = unit_rows(rng, 5, 8), unit_rows(rng, 5, 8), 7.0
    logits = scale * emb_i @ emb_t.T

    def ce(rows):
        return np.mean([np.log(np.sum(np.exp(r))) - r[i] for i, r in enumerate(rows)])

    loss, metrics = clip_task.contrastive_loss(emb_i, emb_t, scale)
    assert float(loss) == pytest.approx(0.5 * (ce(logits) + ce(logits.T)), rel=1e-5)
    assert float(metrics["image_to_text_accuracy"]) == pytest.approx(
        np.mean(np.argmax(logits, 1) == np.arange(5)))


def test_padding_rows_do_not_change_the_loss():
    rng = np.random.default_rng(2)
    emb_i, emb_t = unit_rows(rng, 6, 8), unit_rows(rng, 6, 8)
    loss, metrics = clip_task.contrastive_loss(emb_i, emb_t, 10.0)
    # Three padding rows whose embeddings would be strong negatives if they counted.
    pad_i = np.concatenate([emb_i, emb_t[:3]])
    pad_t = np.concatenate([emb_t, emb_i[:3]])
    mask = np.array([True] * 6 + [False] * 3)
    padded_loss, padded_metrics = clip_task.contrastive_loss(pad_i, pad_t, 10.0, mask)
    assert float(padded_loss) == pytest.approx(float(loss), rel=1e-6)
    for key in metrics:
        assert float(padded_metrics[key]) == pytest.approx(float(metrics[key]), rel=1e-6)
    unmasked, _ = clip_task.contrastive_loss(pad_i, pad_t, 10.0)
    assert abs(float(unmasked) - float(loss)) > 1e-3  # the mask is what kept them out


def test_recall_at_k_on_a_hand_made_similarity():
    s = np.array([[0.9, 0.1, 0.3],
                  [0.8, 0.5, 0.2],
                  [0.1, 0.7, 0.6]])
    # image->text: row 0 first, rows 1 and 2 second; text->image: columns 0 and 2 first.
    assert clip_task.recall_at_k(s, 1) == pytest.approx((1 / 3, 2 / 3))
    assert clip_task.recall_at_k(s, 2) == pytest.approx((1.0, 1.0))
    # Without example 1, both remaining pairs are first both ways.
    assert clip_task.recall_at_k(s, 1, mask=[True, False, True]) == pytest.approx((1.0, 1.0))
    # Ties count against the model: a constant (collapsed) similarity retrieves nothing.
    assert clip_task.recall_at_k(np.ones((4, 4)), 1) == (0.0, 0.0)
    assert clip_task.recall_at_k(np.ones((4, 4)), 4) == (1.0, 1.0)
    with pytest.raises(ValueError, match="square"):
        clip_task.recall_at_k(np.ones((2, 3)), 1)


def test_recall_with_repeated_captions_counts_any_right_caption():
    # Images 0 and 1 share a caption text: for either image, both captions are right.
    s = np.array([[0.2, 0.9, 0.1],
                  [0.8, 0.3, 0.4],
                  [0.5, 0.6, 0.7]])
    relevant = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
    # Exact pairs: only image 2 / caption 2 ranks its own partner first.
    assert clip_task.recall_at_k(s, 1) == pytest.approx((1 / 3, 1 / 3))
    # Same-caption: images 0, 1 and 2 find a right caption first; caption 0's best right image
    # (0.8) beats the wrong one (0.5), caption 1's (0.9) beats 0.6, caption 2's 0.7 beats 0.4.
    assert clip_task.recall_at_k(s, 1, relevant=relevant) == pytest.approx((1.0, 1.0))
    # A wrong answer tied with the best right one counts against it.
    tied = s.copy()
    tied[2, 0] = 0.8
    assert clip_task.recall_at_k(tied, 1, relevant=relevant)[1] == pytest.approx(2 / 3)
    np.testing.assert_array_equal(retrieval.same_caption(["a", "b", "a"]),
                                  [[1, 0, 1], [0, 1, 0], [1, 0, 1]])


def test_eval_sums_agree_with_recall_at_k(small):
    config, task, model = small
    batch = {"image": images(config, 8, seed=3), "text": captions(config, [1, 2, 3, 4] * 2, 3),
             "mask": np.array([True] * 6 + [False] * 2)}
    sums, (image_emb, text_emb, _) = jax.device_get(nnx.jit(
        lambda m, b: (task.eval_sums(m, b), m(b["image"], b["text"])))(model, batch))
    summary = task.summarize(sums)
    sims = np.asarray(image_emb)[:6] @ np.asarray(text_emb)[:6].T
    for k in (1, 5):
        i2t, t2i = clip_task.recall_at_k(sims, k)
        assert summary[f"image_to_text_recall_at_{k}_in_batch"] == pytest.approx(i2t, abs=1e-6)
        assert summary[f"text_to_image_recall_at_{k}_in_batch"] == pytest.approx(t2i, abs=1e-6)
    assert float(sums["count"]) == 6 and summary["recall_at_1_chance_in_batch"] == pytest.approx(
        1 / 6)


# --- the towers ---------------------------------------------------------------------------

def test_text_features_come_from_the_end_token(small):
    config, _, model = small
    text = captions(config, [2, 3])  # eos at positions 3 and 4
    encode = nnx.jit(lambda m, t: m.encode_text(t))
    base = np.asarray(encode(model, text))
    np.testing.assert_allclose(np.linalg.norm(base, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(clip.eos_positions(jnp.asarray(text)), [3, 4])

    after_eos = text.copy()
    after_eos[:, -1] = 7  # a token after the end (where a pad was) is never seen
    np.testing.assert_array_equal(encode(model, after_eos), base)
    word = text.copy()
    word[:, 1] = 4 + (word[:, 1] - 3) % (config.text.vocab_size - 4)  # a different first word
    assert np.all(np.abs(np.asarray(encode(model, word)) - base).max(axis=1) > 1e-4)


@pytest.mark.parametrize("pooling", ["mean", "class"])
def test_image_embeddings_are_normalised_and_depend_on_the_image(pooling):
    config = small_config(image_pooling=pooling, image_depth=1, text_depth=1)
    model = clip.CLIP(clip.clip_config(config.model, config.data, config.text, "float32"),
                      rngs=fast_rngs())
    pictures = images(config, 3)
    encode = nnx.jit(lambda m, x: m.encode_images(x))
    embedded = np.asarray(encode(model, pictures))
    assert embedded.shape == (3, config.model.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, rtol=1e-5)
    changed = pictures.copy()
    changed[0, :4, :4] = 255 - changed[0, :4, :4]  # one patch of the first image
    moved = np.asarray(encode(model, changed))
    assert np.abs(moved[0] - embedded[0]).max() > 1e-5
    np.testing.assert_allclose(moved[1:], embedded[1:], rtol=1e-6)


@pytest.mark.parametrize("position", ["learned", "sincos2d"])
def test_image_embeddings_depend_on_where_a_patch_is(position):
    """Mean pooling over a full-attention stack is blind to the patches' order: only the
    position features tell "a red circle left of a blue square" from its mirror."""
    config = small_config(image_position=position, image_depth=1, text_depth=1)
    model = clip.CLIP(clip.clip_config(config.model, config.data, config.text, "float32"),
                      rngs=fast_rngs())
    assert hasattr(model, "image_position") == (position == "learned")
    pictures = images(config, 1)
    swapped = pictures.copy()
    swapped[0, :4, :4], swapped[0, :4, 4:8] = pictures[0, :4, 4:8], pictures[0, :4, :4]
    encode = nnx.jit(lambda m, x: m.encode_images(x))
    assert np.abs(np.asarray(encode(model, swapped)) - np.asarray(encode(model, pictures))
                  ).max() > 1e-4


def test_sincos_2d_features_are_sines_of_column_and_row():
    grid, width = 3, 8
    features = np.asarray(clip.sincos_2d(grid, width))
    omega = 1.0 / 10_000.0 ** np.array([0.0, 1.0])  # width/4 = 2 frequencies
    for index in range(grid * grid):
        y, x = divmod(index, grid)  # raster order, as patchify
        np.testing.assert_allclose(features[index], np.concatenate(
            [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)]),
            atol=1e-6)
    assert len({row.tobytes() for row in features}) == grid * grid


def test_patchify_is_raster_order():
    x = np.arange(4 * 4 * 3).reshape(1, 4, 4, 3)
    patches = np.asarray(clip.patchify(jnp.asarray(x), 2))
    assert patches.shape == (1, 4, 12)
    np.testing.assert_array_equal(patches[0, 1], x[0, :2, 2:].reshape(-1))  # top-right
    np.testing.assert_array_equal(patches[0, 2], x[0, 2:, :2].reshape(-1))  # bottom-left


# --- config errors ------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, match", [
    ("patch_size", 5, "config.model.patch_size=5 does not divide config.data.image_size=16"),
    ("image_heads", 3,
     "config.model.image_width=32 does not divide into config.model.image_heads=3"),
    ("text_depth", 0, "config.model.text_depth=0 must be positive"),
    ("embed_dim", -4, "config.model.embed_dim=-4 must be positive"),
    ("text_mlp_ratio", 0.1, "config.model.text_mlp_ratio=0.1"),
    ("image_pooling", "max", "config.model.image_pooling='max'"),
    ("image_position", "rope", "config.model.image_position='rope'"),
    ("remat", "some", "config.model.remat='some'"),
])
def test_bad_model_config_is_a_one_line_error(key, value, match):
    config = small_config(**{key: value})
    with pytest.raises(ValueError, match=match) as info:
        get_task(config)
    assert "\n" not in str(info.value)


def test_sincos_positions_need_a_width_divisible_by_4():
    config = small_config(image_position="sincos2d", image_width=6, image_heads=2)
    with pytest.raises(ValueError, match="config.model.image_width=6 must be a multiple of 4"):
        get_task(config)


def test_full_size_config_builds_abstractly():
    config = config_lib.load("clip")
    config_lib.validate(config)
    task = get_task(config)
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: task.build_model(fast_rngs()))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # ViT-B/16 (≈86M) + CLIP's text tower (≈46M with 16384 rather than 49408 tokens).
    assert 125e6 < count < 140e6, count
    assert model.cfg.num_patches == 256 and model.cfg.text.depth == 12


# --- a short training run (the `clip_run` fixture in conftest.py) --------------------------

def test_short_training_raises_recall_above_chance(clip_run):
    workdir = clip_run
    records = metrics_lib.read_metrics(workdir)
    final = [r for r in records if "eval/text_to_image_recall_at_1_in_batch" in r][-1]
    chance = final["eval/recall_at_1_chance_in_batch"]
    assert chance == pytest.approx((3 * 32 * (1 / 32) + 4 * (1 / 4)) / 100)  # 32+32+32+4
    assert final["eval/text_to_image_recall_at_1_in_batch"] > 3 * chance, final
    assert final["eval/image_to_text_recall_at_1_in_batch"] > 3 * chance, final
    assert final["eval/image_to_text_recall_at_5_in_batch"] > 0.4, final
    train = [r for r in records if "train/logit_scale" in r][-1]
    assert 1.0 < train["train/logit_scale"] <= 100.0
    assert os.listdir(os.path.join(workdir, "images"))  # retrieval grids were logged

    # The loop's zero-shot figures are those of the saved model, evaluated afresh.
    scorer = ClipScorer.from_workdir(workdir)
    examples = load_examples(workdir_lib.read_config(workdir))
    result = zero_shot.zero_shot_accuracy(scorer, examples.images, examples.objects)
    assert 20 < result["count"] < 80  # about half of the 100 validation images
    for name in ("colour", "shape", "position", "relation"):
        assert final[f"eval/zero_shot_{name}_accuracy"] == pytest.approx(
            result[f"{name}_accuracy"])


def test_retrieval_report_of_a_workdir_gives_recall_and_zero_shot(clip_run):
    report = retrieval.report_for_workdir(clip_run, batch=32)
    assert report["examples"] == 100
    scorer = ClipScorer.from_workdir(clip_run)
    examples = load_examples(workdir_lib.read_config(clip_run))
    sims = scorer.similarity(examples.images, examples.captions)
    relevant = retrieval.same_caption(examples.captions)
    assert report["text_to_image_recall_at_1"] == pytest.approx(
        clip_task.recall_at_k(sims, 1, relevant=relevant)[1])
    blocks = [sims[i:i + 32, i:i + 32] for i in range(0, 100, 32)]  # 32, 32, 32 and 4
    assert report["image_to_text_recall_at_5_in_batch_32"] == pytest.approx(
        sum(clip_task.recall_at_k(b, 5)[0] * len(b) for b in blocks) / 100)
    assert set(report["zero_shot"]) == {"colour_accuracy", "shape_accuracy", "position_accuracy",
                                        "count", "relation_accuracy", "relation_pairs"}
    with pytest.raises(FileNotFoundError, match="not a training workdir"):
        retrieval.report_for_workdir(os.path.dirname(clip_run))
