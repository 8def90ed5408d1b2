"""The dVAE: architecture, pixel likelihood, relaxation schedules, evaluation, sharding."""
import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dalle_jax import config_lib
from dalle_jax.models import dvae
from dalle_jax.sharding import logical
from dalle_jax.sharding.mesh import build_mesh
from dalle_jax.tasks import get_task
from dalle_jax.tasks import dvae as dvae_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(**model):
    """configs/dvae_mini.py shrunk to 8 px, 2 groups, 16 codes: fast enough to run eagerly."""
    config = load_config("dvae_mini")
    config.data.image_size = 8
    config.model.update(dict(image_size=8, n_hid=16, num_groups=2, blocks_per_group=1,
                             vocab_size=16, n_init=8), **model)
    return config


def fast_rngs(seed=0):
    """Rngs on the 'rbg' key implementation: XLA on a CPU compiles threefry's normal draws
    slowly (about a second per parameter shape), which would dominate these tests."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def random_images(batch, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny():
    config = tiny_config()
    task = get_task(config)
    return config, task, task.build_model(fast_rngs())


def param_count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# --- architecture -------------------------------------------------------------------------

def test_mini_config_shapes_for_real():
    config = load_config("dvae_mini")
    model = get_task(config).build_model(fast_rngs())

    @nnx.jit
    def run(model, images):
        logits = model.encoder_logits(images)
        return logits, model.decode_logits(jax.nn.softmax(logits))

    logits, (mu, log_b) = run(model, random_images(2, 32))
    assert logits.shape == (2, 8, 8, config.model.vocab_size) and logits.dtype == jnp.float32
    assert mu.shape == log_b.shape == (2, 32, 32, 3)


def test_paper_config_shapes_and_parameter_counts_without_allocating():
    config = load_config("dvae")
    task = get_task(config)
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    # OpenAI's released Encoder / Decoder have 53,786,240 / 43,829,766 parameters.
    assert param_count(model.encoder) == pytest.approx(53.8e6, rel=0.02)
    assert param_count(model.decoder) == pytest.approx(43.8e6, rel=0.02)

    def run(images):
        m = task.build_model(nnx.Rngs(0))
        logits = m.encoder_logits(images)
        return logits, m.decode_logits(logits)

    logits, (mu, log_b) = jax.eval_shape(run, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.uint8))
    assert logits.shape == (1, 32, 32, 8192) and logits.dtype == jnp.float32  # fp32 in bf16 runs
    assert mu.shape == log_b.shape == (1, 256, 256, 3)


def test_post_gain_is_one_over_n_layers_squared():
    config = tiny_config(num_groups=2, blocks_per_group=3)
    model = nnx.eval_shape(lambda: dvae.DVAE(config.model, jnp.float32, fast_rngs()))
    for blocks in list(model.encoder.groups) + list(model.decoder.groups):
        assert all(block.post_gain == pytest.approx(1 / (2 * 3) ** 2) for block in blocks)


def test_post_gain_scales_the_residual_branch(tiny):
    _, _, model = tiny
    block = nnx.clone(model.encoder.groups[0][0])  # same widths in and out: identity path
    assert block.id_path is None and block.post_gain == pytest.approx(1 / 2 ** 2)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 16)), jnp.float32)
    np.testing.assert_allclose(block(x) - x, block.post_gain * block.residual(x), atol=1e-5)

    last = block.res_path[-1]
    last.kernel[...] = jnp.zeros_like(last.kernel[...])  # no residual branch left: identity
    np.testing.assert_allclose(block(x), x, atol=1e-6)


def test_widening_blocks_project_the_identity(tiny):
    _, _, model = tiny
    assert model.encoder.groups[1][0].id_path.kernel.shape == (1, 1, 16, 32)
    assert model.decoder.groups[0][0].id_path.kernel.shape == (1, 1, 8, 32)


def test_conv_init_is_normal_with_std_one_over_sqrt_fan_in(tiny):
    _, _, model = tiny
    conv = model.encoder.groups[1][0].res_path[0]  # 3x3, 16 -> 8: 1152 weights
    assert conv.kernel.shape == (3, 3, 16, 8)
    assert np.std(conv.kernel[...]) == pytest.approx(1 / math.sqrt(16 * 9), rel=0.08)
    assert not np.any(conv.bias[...])


def brute_force_conv(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Stride-1 'same' convolution by explicit sums over the window (float64)."""
    k = kernel.shape[0]
    pad = k // 2
    padded = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
    for dy in range(k):
        for dx in range(k):
            window = padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]
            out += window @ kernel[dy, dx].astype(np.float64)
    return out + bias


@pytest.mark.parametrize("n_in", [3, 5, 8])
def test_conv_equals_the_window_sums_whatever_its_input_channels(n_in):
    # Inputs whose channels are not a multiple of 4 (the RGB layer) are padded with zero
    # channels for speed; the values and the kernel's gradient must not change.
    conv = dvae.Conv(n_in, 6, 7 if n_in == 3 else 3, dtype=jnp.float32, rngs=fast_rngs())
    conv.bias[...] = jnp.linspace(-1.0, 1.0, 6)
    x = np.random.default_rng(n_in).normal(size=(2, 9, 9, n_in)).astype(np.float32)
    kernel, bias = np.asarray(conv.kernel[...]), np.asarray(conv.bias[...])
    np.testing.assert_allclose(conv(x), brute_force_conv(x, kernel, bias), atol=1e-5)

    weights = np.random.default_rng(1).normal(size=(2, 9, 9, 6))

    def loss(conv):
        return jnp.sum(conv(x) * weights)

    # d loss / d kernel[dy, dx, i, o] = sum of weights[.., o] times the input it multiplies.
    pad = kernel.shape[0] // 2
    padded = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    expected = np.stack([np.stack([
        np.einsum("byxi,byxo->io", padded[:, dy:dy + 9, dx:dx + 9], weights)
        for dx in range(kernel.shape[1])]) for dy in range(kernel.shape[0])])
    np.testing.assert_allclose(nnx.grad(loss)(conv).kernel[...], expected, atol=1e-4)


@pytest.mark.parametrize("key,value,match", [
    ("image_size", 10, "config.model.image_size"),
    ("n_hid", 6, "config.model.n_hid"),
    ("vocab_size", 1, "config.model.vocab_size"),
    ("blocks_per_group", 0, "config.model.blocks_per_group"),
])
def test_bad_model_config_is_a_one_line_error(key, value, match):
    config = tiny_config(num_groups=3, image_size=16)
    config.model[key] = value
    with pytest.raises(ValueError, match=match):
        dvae.DVAE(config.model, jnp.float32, fast_rngs())


# --- the tokenizer API --------------------------------------------------------------------

def test_encode_and_decode(tiny):
    config, _, model = tiny
    images = random_images(3, 8)
    tokens = model.encode(images)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == jnp.int32
    assert 0 <= int(tokens.min()) and int(tokens.max()) < config.model.vocab_size
    np.testing.assert_array_equal(tokens, model.encode(images))  # deterministic
    np.testing.assert_array_equal(tokens, model.encode(images / 255.0))  # uint8 == float input
    decoded = model.decode(tokens)
    assert decoded.shape == (3, 8, 8, 3) and decoded.dtype == jnp.float32
    assert 0.0 <= float(decoded.min()) and float(decoded.max()) <= 1.0


def test_decode_by_gather_equals_the_one_hot_codebook_conv(tiny):
    config, _, model = tiny
    tokens = model.encode(random_images(2, 8))
    mu, _ = model.decode_logits(jax.nn.one_hot(tokens, config.model.vocab_size))
    np.testing.assert_allclose(model.decode(tokens), dvae.unmap_pixels(jax.nn.sigmoid(mu)),
                               atol=1e-5)


# --- loss terms ---------------------------------------------------------------------------

def test_logit_laplace_nll_matches_the_density_formula():
    rng = np.random.default_rng(0)
    x = dvae.map_pixels(rng.uniform(size=1000))
    mu, log_b = rng.normal(size=1000) * 2, rng.normal(size=1000)
    b = np.exp(log_b)
    density = 1 / (2 * b * x * (1 - x)) * np.exp(-np.abs(np.log(x / (1 - x)) - mu) / b)
    nll = dvae_task.logit_laplace_nll(jnp.asarray(x, jnp.float32), jnp.asarray(mu, jnp.float32),
                                      jnp.asarray(log_b, jnp.float32))
    np.testing.assert_allclose(nll, -np.log(density), rtol=1e-4, atol=1e-4)


def test_scale_weighting_gives_mu_an_l1_gradient_and_keeps_the_optimal_scale():
    x = jnp.asarray(dvae.map_pixels(np.linspace(0.05, 0.95, 6)), jnp.float32)  # no 0 residual
    mu, log_b = jnp.zeros(6), jnp.full(6, 0.7)

    def total(mu, log_b, power):
        nll = dvae_task.logit_laplace_nll(x, mu, log_b)
        return jnp.sum(dvae_task.scale_weighted(nll, log_b, power))

    residual = jnp.log(x) - jnp.log1p(-x) - mu
    grad_mu = jax.grad(total)(mu, log_b, 1.0)
    np.testing.assert_allclose(grad_mu, -jnp.sign(residual), atol=1e-6)  # whatever b is
    # The weighting leaves b's optimum where it was: b = |residual|.
    at_optimum = jnp.log(jnp.abs(residual))
    np.testing.assert_allclose(jax.grad(total, argnums=1)(mu, at_optimum, 1.0), 0.0, atol=1e-5)
    assert float(total(mu, log_b, 0.0)) == pytest.approx(
        float(jnp.sum(dvae_task.logit_laplace_nll(x, mu, log_b))))


def test_kl_to_uniform_is_zero_for_uniform_logits_and_matches_numpy():
    assert float(jnp.max(jnp.abs(dvae_task.kl_to_uniform(jnp.full((4, 32), 3.0))))) < 1e-6
    logits = np.random.default_rng(0).normal(size=(5, 32)) * 3
    q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np.sum(q * np.log(q * 32), axis=-1)
    kl = dvae_task.kl_to_uniform(jnp.asarray(logits, jnp.float32))
    assert np.all(np.asarray(kl) > 0)
    np.testing.assert_allclose(kl, expected, rtol=1e-4)


def test_schedules_end_points_and_monotonicity():
    task = load_config("dvae").task
    beta, tau = dvae_task.kl_weight_schedule(task), dvae_task.temperature_schedule(task)
    assert float(beta(0)) == 0.0 and float(beta(5000)) == pytest.approx(6.6)
    assert float(beta(10**6)) == pytest.approx(6.6)
    assert float(tau(0)) == pytest.approx(1.0) and float(tau(150_000)) == pytest.approx(1 / 16)
    assert float(tau(10**6)) == pytest.approx(1 / 16)
    steps = jnp.arange(0, 200_000, 997)
    assert np.all(np.diff(np.asarray(beta(steps))) >= 0)
    assert np.all(np.diff(np.asarray(tau(steps))) <= 0)
    optax_tau = optax.cosine_decay_schedule(1.0, 150_000, alpha=1 / 16)
    np.testing.assert_allclose(tau(steps), optax_tau(steps), rtol=1e-5)


def test_kl_weight_can_fall_after_its_warm_up():
    task = load_config("dvae").task
    task.update(dict(kl_weight=0.5, kl_warmup_steps=100, kl_weight_end=0.05,
                     kl_decay_steps=1000))
    beta = dvae_task.kl_weight_schedule(task)
    assert float(beta(0)) == 0.0 and float(beta(100)) == pytest.approx(0.5)
    assert float(beta(1100)) == pytest.approx(0.05) and float(beta(10**6)) == pytest.approx(0.05)
    assert float(beta(600)) == pytest.approx(0.275)  # half-way down the half cosine
    values = np.asarray(beta(jnp.arange(0, 2000, 7)))
    peak = int(np.argmax(values))
    assert np.all(np.diff(values[:peak + 1]) >= 0) and np.all(np.diff(values[peak:]) <= 0)


def test_loss_is_finite_ignores_masked_rows_and_logs_its_metrics(tiny):
    _, task, model = tiny
    images = random_images(4, 8)
    mask = np.array([True, True, True, False])
    rng, step = jax.random.key(0), jnp.asarray(100)
    loss_fn = nnx.jit(task.loss)  # one compilation for both calls
    loss, metrics = loss_fn(model, {"image": images, "mask": mask}, rng, step)
    assert np.isfinite(float(loss))
    assert {"nll", "kl", "kl_weight", "temperature", "mse"} <= set(metrics)
    # rel 1e-5: the jitted float32 cosine and the eager one round differently.
    assert float(metrics["kl_weight"]) == pytest.approx(float(task.kl_weight(100)), rel=1e-5)
    padded = images.copy()
    padded[3] = 0  # only the masked row changes
    loss2, _ = loss_fn(model, {"image": padded, "mask": mask}, rng, step)
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)


def test_loss_in_bfloat16_keeps_float32_logits(tiny):
    config = tiny_config()
    config.train.compute_dtype = "bfloat16"
    task = get_task(config)
    # The bfloat16 model's structure with the fixture's (float32) parameters: no new init.
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: task.build_model(fast_rngs())))
    model = nnx.merge(graphdef, nnx.state(tiny[2]))
    assert model.encoder.input_conv.dtype == jnp.bfloat16
    batch = {"image": random_images(2, 8), "mask": np.ones(2, bool)}

    def run(task, model):
        return nnx.jit(lambda m, b: (task.loss(m, b, jax.random.key(0), jnp.asarray(0))[0],
                                     m.encoder_logits(b["image"])))(model, batch)

    loss, logits = run(task, model)
    assert logits.dtype == jnp.float32
    # Against the float32 model: bf16 rounds activations to 8 bits of mantissa (relative
    # 2^-8 per rounding), and the logits sit a few roundings deep.
    loss32, logits32 = run(tiny[1], tiny[2])
    scale = float(np.abs(np.asarray(logits32)).max())
    np.testing.assert_allclose(logits, logits32, atol=0.03 * scale)
    assert float(loss) == pytest.approx(float(loss32), rel=0.03)


# --- evaluation ---------------------------------------------------------------------------

def test_summarize_on_hand_computed_sums(tiny):
    _, task, _ = tiny
    sums = {"mse": np.float32(0.04), "psnr": np.float32(50.0), "count": np.int32(2),
            "code_counts": np.array([3, 3, 0, 0, 3, 3], np.int32)}
    summary = task.summarize(sums)
    assert summary["mse"] == pytest.approx(0.02)
    assert summary["psnr"] == pytest.approx(10 * math.log10(1 / 0.02))
    assert summary["mean_example_psnr"] == pytest.approx(25.0)
    assert summary["codebook_perplexity"] == pytest.approx(4.0)  # 4 codes used equally
    assert summary["codes_used"] == pytest.approx(4 / 6)


def test_eval_sums_count_only_real_rows(tiny):
    config, task, model = tiny
    images = random_images(3, 8)
    mask = np.array([True, False, True])
    sums = task.eval_sums(model, {"image": images, "mask": mask})
    tokens, recon = task.reconstruct(model, images)
    mse = np.mean((np.asarray(recon) - images / 255.0) ** 2, axis=(1, 2, 3))
    assert int(sums["count"]) == 2
    assert float(sums["mse"]) == pytest.approx(mse[0] + mse[2], rel=1e-5)
    assert float(sums["psnr"]) == pytest.approx(float(np.sum(10 * np.log10(1 / mse[[0, 2]]))),
                                                rel=1e-5)
    expected_counts = np.bincount(np.asarray(tokens)[[0, 2]].ravel(),
                                  minlength=config.model.vocab_size)
    np.testing.assert_array_equal(sums["code_counts"], expected_counts)


def test_log_images_puts_originals_above_reconstructions(tiny):
    _, task, model = tiny
    images = random_images(10, 8)
    grid = task.log_images(model, {"image": images, "mask": np.ones(10, bool)})
    assert grid.shape == (16, 64, 3) and grid.dtype == jnp.uint8
    np.testing.assert_array_equal(grid[:8, 8:16], images[1])


# --- registry -----------------------------------------------------------------------------

def test_get_task_rejects_an_unknown_name():
    config = tiny_config()
    config.task.name = "dvea"
    with pytest.raises(ValueError, match="config.task.name='dvea'"):
        get_task(config)


def test_task_rejects_model_and_data_sizes_that_differ():
    config = tiny_config()
    config.data.image_size = 16
    with pytest.raises(ValueError, match="config.model.image_size"):
        get_task(config)


# --- sharding -----------------------------------------------------------------------------

def test_model_under_a_mesh_shards_conv_out_over_fsdp():
    config = tiny_config(num_groups=1)  # few parameter shapes: few compilations
    config.mesh.shape = (2, 4, 1)
    mesh, rules = build_mesh(config.mesh), config_lib.DEFAULT_RULES
    task = get_task(config)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        # As the training loop does: plan shardings abstractly, create parameters in place.
        abstract = nnx.eval_shape(lambda: task.build_model(fast_rngs()))
        graphdef, abstract_state = nnx.split(abstract)
        shardings = logical.state_shardings(abstract_state, mesh, rules)
        state = jax.jit(lambda: nnx.split(task.build_model(fast_rngs()))[1],
                        out_shardings=shardings)()
        model = nnx.merge(graphdef, state)
        kernel = model.encoder.input_conv.kernel[...]
        assert kernel.sharding.spec == jax.P(None, None, None, "fsdp")
        assert model.decoder.output_conv.kernel[...].sharding.spec == jax.P(None, None, None,
                                                                              None)
        images = jnp.asarray(random_images(8, 8))
        logits = jax.jit(lambda s, x: nnx.merge(graphdef, s).encoder_logits(x))(state, images)
        assert logits.sharding.spec[0] == ("data", "fsdp")

        eager = task.build_model(fast_rngs())  # eager creation shards too
        assert eager.decoder.input_conv.kernel[...].sharding.spec == jax.P(None, None, None,
                                                                             "fsdp")
