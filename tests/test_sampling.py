"""KV-cached decoding and sampling controls, against the teacher-forced model and each other."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax.models import dalle
from dalle_jax.sampling import decode
from dalle_jax.sampling.generator import Generator, Settings, image_keys
from test_dalle import captions, fast_rngs, image_tokens, small_config


@pytest.fixture(scope="module")
def small():
    cfg = small_config()
    return cfg, dalle.DALLE(cfg, rngs=fast_rngs())


def for_inference(small, dtype):
    """The `small` model as `Generator.from_workdir(dtype=...)` loads it: parameters cast to
    `dtype`, computing (and caching keys and values) in it."""
    cfg, model = small
    if dtype == "float32":
        return model
    block = dataclasses.replace(cfg.block, dtype=dtype)
    cast = nnx.clone(dalle.DALLE(dataclasses.replace(cfg, block=block), rngs=fast_rngs()))
    nnx.update(cast, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param)))
    return cast


def cached_logits(model, text, tokens, implementation, split_weights=False):
    """The image logits of a prefill and a decode step per given token (teacher forcing
    through the cache); with `split_weights`, the layers' weights split once before the loop
    (`DALLE.decode_weights`) as the sampler does on a CPU, else sliced at every step."""
    n, vocab = model.cfg.image_length, model.cfg.image_vocab_size

    @nnx.jit
    def run(model, text, tokens):
        first, cache = model.prefill(text, model.init_cache(text.shape[0]))
        out = jnp.zeros((text.shape[0], n, vocab)).at[:, 0].set(first)
        weights = model.decode_weights() if split_weights else None

        def step(a, carry):
            cache, out = carry
            logits, cache = model.decode_step(tokens[:, a], a, cache, implementation,
                                              weights=weights)
            return cache, out.at[:, a + 1].set(logits)

        return jax.lax.fori_loop(0, n - 1, step, (cache, out))[1]

    return run(model, text, tokens)


# Cached against teacher-forced logits: the same float32 computation up to its order; in
# bfloat16 both round the same keys and values, but the cached path's one-row matmuls and the
# full forward's round partial results at different points (tolerance: BENCHMARKS.md,
# "bfloat16 against float32").
CACHED_ATOL = {"float32": 2e-5, "bfloat16": 6e-3}


@pytest.mark.parametrize("implementation, dtype, split_weights", [
    ("sparse", "float32", False), ("sparse", "float32", True), ("dense", "float32", True),
    ("sparse", "bfloat16", True)])
def test_cached_logits_equal_the_teacher_forced_forward_at_every_step(small, implementation,
                                                                       dtype, split_weights):
    cfg, _ = small
    model = for_inference(small, dtype)
    text, tokens = captions(cfg, [2, 3]), image_tokens(cfg, 2)
    _, teacher_forced = nnx.jit(lambda m, t, i: m(t, i))(model, text, tokens)
    logits = cached_logits(model, text, tokens, implementation, split_weights)
    assert logits.dtype == teacher_forced.dtype == jnp.float32
    np.testing.assert_allclose(logits, teacher_forced, atol=CACHED_ATOL[dtype])


@pytest.mark.parametrize("implementation", ["sparse", "dense"])
def test_cached_logits_of_causal_layers_equal_the_teacher_forced_forward(small, implementation):
    """`layers="causal"` (every layer reads the whole cache) against the full forward."""
    cfg, _ = small
    model = dalle.DALLE(dataclasses.replace(cfg, layers="causal"), rngs=fast_rngs())
    text, tokens = captions(cfg, [2, 3]), image_tokens(cfg, 2)
    _, teacher_forced = nnx.jit(lambda m, t, i: m(t, i))(model, text, tokens)
    logits = cached_logits(model, text, tokens, implementation)
    np.testing.assert_allclose(logits, teacher_forced, atol=CACHED_ATOL["float32"])


def test_greedy_bf16_tokens_follow_float32_until_a_near_tie(small):
    """bf16 moves each logit by up to about 1% of the largest (BENCHMARKS.md, "bfloat16 against
    float32"), so greedy decoding picks the same tokens until float32's two best logits are
    that close; from there on the images may differ, as each token conditions the next."""
    cfg, model = small
    text = captions(cfg, [1, 2, 3, 4, 2, 1])
    seeds = list(range(len(text)))
    ours = sample(for_inference(small, "bfloat16"), text, seeds, temperature=0.0)
    ref = sample(model, text, seeds, temperature=0.0)
    _, ref_logits = nnx.jit(lambda m, t, i: m(t, i))(model, text, ref)
    ordered = np.sort(np.asarray(ref_logits), axis=-1)
    gap = ordered[..., -1] - ordered[..., -2]
    margin = 0.02 * np.abs(np.asarray(ref_logits)).max()
    same_rows = 0
    for row in range(len(text)):
        differ = np.flatnonzero(ours[row] != ref[row])
        if not len(differ):
            same_rows += 1
            continue
        first = differ[0]
        assert gap[row, first] < margin, (row, first, gap[row, first], margin)
    assert same_rows >= len(text) // 2  # most images are the same


def sample(model, text, seeds, guided=False, split_weights=None, **controls):
    batch = text.shape[0]
    merged = dict(decode.default_controls(batch))
    merged.update({k: jnp.asarray(v) for k, v in controls.items()})
    fn = nnx.jit(decode.sample_image_tokens,
                 static_argnames=("guided", "implementation", "split_weights"))
    return np.asarray(fn(model, jnp.asarray(text), image_keys(0, seeds), merged, guided=guided,
                         split_weights=split_weights))


def test_split_weights_draw_the_same_images_as_weights_sliced_at_every_step(small):
    cfg, model = small
    text = captions(cfg, [2, 3, 1])
    split = sample(model, text, [0, 1, 2], guided=True, guidance=2.0, split_weights=True)
    sliced = sample(model, text, [0, 1, 2], guided=True, guidance=2.0, split_weights=False)
    np.testing.assert_array_equal(split, sliced)


def test_greedy_decoding_equals_argmax_of_the_teacher_forced_model(small):
    cfg, model = small
    text = captions(cfg, [1, 4])
    tokens = sample(model, text, [0, 1], temperature=0.0)
    _, logits = nnx.jit(lambda m, t, i: m(t, i))(model, text, tokens)
    np.testing.assert_array_equal(tokens, np.argmax(np.asarray(logits), axis=-1))


def test_top_k_one_is_greedy_and_guidance_one_is_conditional(small):
    cfg, model = small
    text = captions(cfg, [2, 3, 1])
    greedy = sample(model, text, [0, 1, 2], temperature=0.0)
    np.testing.assert_array_equal(sample(model, text, [0, 1, 2], top_k=1), greedy)
    plain = sample(model, text, [5, 6, 7], temperature=1.0)
    guided = sample(model, text, [5, 6, 7], guided=True, guidance=1.0)
    np.testing.assert_array_equal(guided, plain)
    cond, uncond = np.full((3, 4), 2.0), np.full((3, 4), 0.5)
    mixed = decode.guided_logits(jnp.asarray(np.concatenate([cond, uncond])), 3.0, 3)
    np.testing.assert_allclose(mixed, 0.5 + 3.0 * (2.0 - 0.5))


def teacher_forced_logits(model, text, tokens):
    return np.asarray(nnx.jit(lambda m, t, i: m(t, i))(model, jnp.asarray(text),
                                                       jnp.asarray(tokens))[1])


def assert_greedy_choices(tokens, logits, start=0):
    """Every token from `start` on is the argmax of its logits, and the check can tell: the
    two best logits are apart at most positions (a near-tie could flip either way)."""
    ordered = np.sort(logits, axis=-1)
    gaps = (ordered[..., -1] - ordered[..., -2])[:, start:]
    assert np.mean(gaps > 1e-4) > 0.9
    np.testing.assert_array_equal(tokens[:, start:], np.argmax(logits, axis=-1)[:, start:])


def test_guided_decoding_follows_the_guided_teacher_forced_logits(small):
    """At scale 3 the cached guided decode picks, at every position, the argmax of
    uncond + 3·(cond − uncond) from two teacher-forced forwards (the caption and the empty
    caption) over the drawn tokens; at scale 1 the unconditional stream would cancel out."""
    cfg, model = small
    text = captions(cfg, [2, 3, 1], seed=4)
    tokens = sample(model, text, [0, 1, 2], guided=True, guidance=3.0, temperature=0.0)
    cond = teacher_forced_logits(model, text, tokens)
    uncond = teacher_forced_logits(model, np.asarray(dalle.empty_captions(*text.shape)), tokens)
    assert_greedy_choices(tokens, uncond + 3.0 * (cond - uncond))
    assert not np.array_equal(tokens, np.argmax(cond, axis=-1))  # guidance changed the picks


def test_completion_continues_from_the_kept_tokens_at_every_position(small):
    """The completed images' tokens after the kept prefix are the greedy choices of the
    teacher-forced model over the prefix and the drawn tail, position by position."""
    cfg, model = small
    text = captions(cfg, [2, 3])
    given = image_tokens(cfg, 2, seed=9)
    keep = np.array([4, 9], np.int32)
    tokens = sample(model, text, [0, 1], given=given, keep=keep, temperature=0.0)
    logits = teacher_forced_logits(model, text, tokens)
    for row, k in enumerate(keep):
        np.testing.assert_array_equal(tokens[row, :k], given[row, :k])
        assert_greedy_choices(tokens[row:row + 1], logits[row:row + 1], start=int(k))


def filtered_distribution(logits, temperature, top_k, top_p):
    """NumPy: softmax(logits / T) over the top-k tokens of the top-p nucleus, renormalised."""
    order = np.argsort(-logits)
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    keep = np.zeros(len(logits), bool)
    mass = 0.0
    for rank, token in enumerate(order):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[token] = True
        mass += probs[token]
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 4, 1.0), (0.8, 0, 0.75), (1.3, 6, 0.9)])
def test_sampled_tokens_follow_the_numpy_distribution(temperature, top_k, top_p):
    """A chi-square goodness-of-fit test of 20,000 draws from fixed logits against the NumPy
    distribution; the threshold's false-alarm rate is 1e-6 per case (fixed seed: the verdict
    is the same on every run)."""
    from scipy import stats

    draws, vocab = 20_000, 10
    logits = np.random.default_rng(1).normal(scale=1.5, size=vocab).astype(np.float32)
    controls = {"temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k),
                "top_p": jnp.float32(top_p)}
    tokens = jax.jit(decode.choose_tokens)(jnp.broadcast_to(jnp.asarray(logits), (draws, vocab)),
                                           jax.random.split(jax.random.key(7), draws), jnp.int32(3),
                                           controls)
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    expected = filtered_distribution(logits.astype(np.float64), temperature, top_k, top_p)
    assert counts[expected == 0].sum() == 0  # nothing outside the filters
    support = expected > 0
    statistic = np.sum((counts[support] - draws * expected[support]) ** 2
                       / (draws * expected[support]))
    assert statistic < stats.chi2.isf(1e-6, df=support.sum() - 1), (counts, expected * draws)


def test_inverse_cdf_draws_follow_the_softmax_across_blocks():
    """`sample_categorical` over a vocabulary of several CDF blocks (the last one partial, one
    without mass, scattered -inf entries): a chi-square test of 40,000 draws against the
    softmax (false-alarm rate 1e-6, fixed seed), and nothing drawn where the mass is zero."""
    from scipy import stats

    draws, vocab = 40_000, 3 * decode.CDF_BLOCK + 20
    rng = np.random.default_rng(2)
    logits = rng.normal(size=vocab)
    logits[decode.CDF_BLOCK:2 * decode.CDF_BLOCK] = -np.inf
    logits[rng.choice(vocab, 30, replace=False)] = -np.inf
    tokens = jax.jit(jax.vmap(decode.sample_categorical))(
        jax.random.split(jax.random.key(5), draws),
        jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (draws, vocab)))
    counts = np.bincount(np.asarray(tokens), minlength=vocab)
    expected = np.exp(logits - logits[np.isfinite(logits)].max())
    expected /= expected.sum()
    assert counts[expected == 0].sum() == 0
    support = expected > 0
    statistic = np.sum((counts[support] - draws * expected[support]) ** 2
                       / (draws * expected[support]))
    assert statistic < stats.chi2.isf(1e-6, df=support.sum() - 1)


def test_a_target_rounded_past_the_last_running_mass_takes_the_last_entry_with_mass():
    mass = jnp.asarray([0.0, 1.0, 0.0, 1.0, 0.0])
    ends = jnp.cumsum(mass)
    assert int(decode._first_past(ends, jnp.float32(0.5), mass)) == 1
    assert int(decode._first_past(ends, jnp.float32(1.0), mass)) == 3
    assert int(decode._first_past(ends, jnp.float32(2.0), mass)) == 3  # not 5, nor 4 (no mass)


def test_an_image_depends_only_on_its_caption_and_key(small):
    cfg, model = small
    text = captions(cfg, [2, 3, 1, 4], seed=3)
    together = sample(model, text, [0, 1, 2, 3])
    reordered = sample(model, text[[2, 0, 3, 1]], [2, 0, 3, 1])
    np.testing.assert_array_equal(reordered, together[[2, 0, 3, 1]])
    assert len({tuple(row) for row in together}) == 4  # different keys, different images


def test_completion_keeps_the_given_tokens_exactly(small):
    cfg, model = small
    text = captions(cfg, [2, 2])
    given = image_tokens(cfg, 2, seed=9)
    keep = np.array([5, 11], np.int32)
    tokens = sample(model, text, [0, 1], given=given, keep=keep)
    for row, k in enumerate(keep):
        np.testing.assert_array_equal(tokens[row, :k], given[row, :k])
    assert not np.array_equal(tokens[0, 5:], given[0, 5:])


def test_filters_match_a_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    for top_k, top_p in [(5, 1.0), (0, 0.6), (7, 0.3), (0, 1.0), (1, 1.0)]:
        kept = np.isfinite(np.asarray(decode.filter_logits(jnp.asarray(logits), jnp.int32(top_k),
                                                           jnp.float32(top_p))))
        for row in range(3):
            order = np.argsort(-logits[row])
            probs = np.exp(logits[row][order] - logits[row].max())
            probs /= probs.sum()
            allowed = set(order[:top_k]) if top_k else set(order)
            mass, nucleus = 0.0, set()
            for token, p in zip(order, probs):
                if mass >= top_p:
                    break
                nucleus.add(token)
                mass += p
            assert set(np.nonzero(kept[row])[0]) == (allowed & nucleus), (top_k, top_p, row)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="top_p=0"):
        Settings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature=-1"):
        Settings(temperature=-1.0)


class FakeTokenizer:
    """Word ids from a fixed table: enough to drive the Generator without SentencePiece."""
    vocab_size = 16

    def count(self, caption):
        return len(caption.split()) + 2

    def encode(self, caption, length):
        ids = np.zeros(length, np.int32)
        words = [4 + (sum(map(ord, w)) % 12) for w in caption.split()][:length - 2]
        ids[0], ids[1:1 + len(words)], ids[1 + len(words)] = 2, words, 3
        return ids


def test_new_prompts_and_seeds_do_not_recompile(small):
    cfg, model = small
    generate = Generator(model, codec=None, tokenizer=FakeTokenizer(), batch_size=4)
    first = generate.tokens(["a red circle", "a blue square"], n=3, seed=0)  # 6 = 4 + padded 2
    assert first.shape == (6, cfg.image_length)
    generate.tokens(["a green triangle above a red square"], n=2, seed=7,
                    settings=Settings(temperature=0.7, top_k=5, top_p=0.9))
    assert generate.compilations == 1
    # The same (prompt, seed, index) draws the same image in another batch composition.
    again = generate.tokens(["a blue square"], n=3, seed=0)
    np.testing.assert_array_equal(again, first[3:])
    with pytest.raises(ValueError, match="n=0"):
        generate.tokens(["a red circle"], n=0)
    with pytest.raises(ValueError, match="empty"):
        generate.tokens(["  "], n=1)


def test_sampling_on_a_mesh_matches_one_device():
    from dalle_jax import config_lib
    from dalle_jax.sharding import logical
    from dalle_jax.sharding.mesh import build_mesh

    cfg = small_config()
    model = dalle.DALLE(cfg, rngs=fast_rngs())
    prompts = ["a red circle", "a blue square", "a green circle", "a cyan square"]
    greedy = Settings(temperature=0.0)
    alone = Generator(model, None, FakeTokenizer(), batch_size=4).tokens(prompts, 1,
                                                                         settings=greedy)
    config = config_lib.base_config()
    config.mesh.shape = (2, 1, 4)  # images over data, the 4 heads over tensor
    mesh, rules = build_mesh(config.mesh), logical.normalize_rules(config_lib.DEFAULT_RULES)
    sharded = Generator(nnx.clone(model), None, FakeTokenizer(), batch_size=4, mesh=mesh,
                        rules=rules)
    np.testing.assert_array_equal(sharded.tokens(prompts, 1, settings=greedy), alone)
    heads = sharded._state["stack"]["blocks"]["attention"]["query"][...]
    assert "tensor" in str(heads.sharding.spec)
