"""bfloat16 compute against float32, for every model: the pod configs train in bf16.

Each comparison starts from the same float32 parameters and data and differs only in the
compute dtype. bfloat16 keeps 8 significant bits, a relative rounding error of up to 2⁻⁸ ≈ 0.4%
per rounded value; the models keep parameters, layer-norm statistics, attention scores and
softmax, logits and losses in float32 (tested below), so the errors come from rounding
activations and weights at each matmul's inputs and add up over a few layers, not over a
run. The tolerances are about three times the largest difference seen on these tiny models
(BENCHMARKS.md, "bfloat16 against float32"); a bf16 path that rounded logits, softmax or
the loss, or that lost an attention mask, would miss them by far.
"""
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dalle_jax import tasks
from dalle_jax.models import attention as attn
from dalle_jax.models import dalle, dvae
from dalle_jax.training import optimizer, step as step_lib
from test_clip import small_config as small_clip_config
from test_dalle import captions, image_tokens, small_config as small_dalle_config
from test_dvae import tiny_config as tiny_dvae_config

BF16 = "bfloat16"
STEPS = 3
# Relative differences allowed (see the module doc): losses over the first steps, gradients
# at the initial parameters (norm of the difference over the norm of the float32 gradient).
LOSS_RTOL = {"dvae": 0.01, "dalle": 5e-4, "clip": 0.03}
GRAD_RTOL = {"dvae": 0.07, "dalle": 0.02, "clip": 0.03}
LOGITS_RTOL = 0.025  # of the largest float32 logit
ATTENTION_ATOL = 0.04  # unit-variance queries, keys and values


def fast_rngs(seed=0):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def with_dtype(config, dtype):
    config = config.copy_and_resolve_references()
    config.train.compute_dtype = dtype
    return config


def tiny_dalle_run_config():
    """configs/dalle_mini.py at test_dalle's tiny sizes, and a dVAE whose grid fits it."""
    from dalle_jax import config_lib

    cfg = small_dalle_config()
    config = config_lib.load("dalle_mini")
    config.text.update(dict(length=cfg.text_length, vocab_size=cfg.text_vocab_size))
    config.model.update(dict(grid_size=4, image_vocab_size=16, d_model=32, num_heads=4,
                             head_dim=8, mlp_dim=64, depth=4, conv_kernel=3))
    config.data.image_size = 8
    config.task.caption_dropout = 0.0
    config.task.token_cache = False  # batches of random images, encoded in the step
    return config


def batch_for(name, config, seed=0):
    rng = np.random.default_rng(seed)
    size, batch = config.data.image_size, 4
    out = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
           "mask": np.ones((batch,), bool)}
    if name != "dvae":
        cfg = dataclasses.replace(small_dalle_config(), text_length=config.text.length,
                                  text_vocab_size=config.text.vocab_size)
        out["text"] = captions(cfg, [1, 2, 3, 2][:batch], seed)
    return {k: jnp.asarray(v) for k, v in out.items()}


def make_task(name, config):
    if name == "dalle":
        frozen_dvae = dvae.from_config(tiny_dvae_config(vocab_size=16), fast_rngs(3),
                                       dtype=config.train.compute_dtype)
        return tasks.get_task(config, dvae=frozen_dvae)
    return tasks.get_task(config)


CONFIGS = {"dvae": tiny_dvae_config, "dalle": tiny_dalle_run_config, "clip": small_clip_config}


def losses_and_first_grads(name, dtype, params=None):
    """(losses of STEPS AdamW steps, gradients at the start, the starting parameters): the
    task's loss and the project's optimizer, one compiled loss-and-gradient function."""
    config = with_dtype(CONFIGS[name](), dtype)
    config.optimizer.update(dict(warmup_steps=0, schedule="constant"))  # the steps move
    task = make_task(name, config)
    model = task.build_model(fast_rngs())
    graphdef, own_params, rest = nnx.split(model, nnx.Param, ...)
    params = own_params if params is None else params
    batch = step_lib.with_frozen(batch_for(name, config), task.frozen_state())
    tx, _ = optimizer.make_optimizer(config.optimizer, config.train.steps)

    @jax.jit
    def loss_and_grads(p):
        return jax.value_and_grad(lambda p: task.loss(
            nnx.merge(graphdef, p, rest), batch, jax.random.key(0),
            jnp.zeros((), jnp.int32))[0])(p)

    start, losses, first_grads, opt_state = params, [], None, tx.init(params)
    for _ in range(STEPS):
        loss, grads = loss_and_grads(params)
        assert loss.dtype == jnp.float32
        losses.append(float(loss))
        first_grads = grads if first_grads is None else first_grads
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    return np.array(losses), first_grads, start


@pytest.mark.parametrize("name", ["dvae", "dalle", "clip"])
def test_training_steps_in_bf16_follow_float32(name):
    losses32, grads32, params = losses_and_first_grads(name, "float32")
    losses16, grads16, _ = losses_and_first_grads(name, BF16, params)
    np.testing.assert_allclose(losses16, losses32, rtol=LOSS_RTOL[name])
    flat32 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads32)])
    flat16 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(grads16)])
    assert flat16.dtype == np.float32  # gradients of float32 parameters
    relative = np.linalg.norm(flat16 - flat32) / np.linalg.norm(flat32)
    assert 0 < relative < GRAD_RTOL[name], relative  # bf16 really ran (0 would mean f32)


def small_dalle(dtype):
    cfg = small_dalle_config()
    params = nnx.state(dalle.DALLE(cfg, rngs=fast_rngs()))
    block = dataclasses.replace(cfg.block, dtype=dtype)
    model = dalle.DALLE(dataclasses.replace(cfg, block=block), rngs=fast_rngs())
    nnx.update(model, params)
    return model


def test_transformer_logits_in_bf16_follow_float32_and_stay_float32():
    text = captions(small_dalle_config(), [2, 3])
    tokens = image_tokens(small_dalle_config(), 2)
    ref_text, ref_image = small_dalle("float32")(text, tokens)
    bf_text, bf_image = small_dalle(BF16)(text, tokens)
    assert bf_text.dtype == bf_image.dtype == jnp.float32
    for ours, ref in ((bf_text, ref_text), (bf_image, ref_image)):
        difference = float(jnp.max(jnp.abs(ours - ref)))
        assert 0 < difference < LOGITS_RTOL * float(jnp.max(jnp.abs(ref))), difference


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_sparse_attention_in_bf16_follows_float32(kind):
    layout = attn.Layout(6, 4, 4, 3)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, layout.length, 2, 8)) for i in range(3))
    ref = attn.attention(q, k, v, kind, layout)
    ours = attn.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), kind, layout)
    assert ours.dtype == jnp.bfloat16
    dense = attn.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), kind, layout,
                           implementation="dense")
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref), atol=ATTENTION_ATOL)
    # The sparse path against the dense masked reference, both in bf16: the same masks.
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(dense, np.float32),
                               atol=0.01)


def exp_dtypes(fn, *args):
    """The dtypes of every exp in fn's program: where the softmaxes are computed."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "exp":
                found.append(eqn.outvars[0].aval.dtype)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_softmax_logits_and_loss_stay_float32_in_bf16():
    model = small_dalle(BF16)
    text = captions(small_dalle_config(), [2, 3])
    tokens = image_tokens(small_dalle_config(), 2)
    dtypes = exp_dtypes(lambda t, i: model(t, i), text, tokens)
    assert dtypes and set(dtypes) == {jnp.dtype(jnp.float32)}  # every attention softmax
    config = with_dtype(tiny_dalle_run_config(), BF16)
    task = make_task("dalle", config)
    loss, _ = task.loss(task.build_model(fast_rngs()),
                        step_lib.with_frozen(batch_for("dalle", config), task.frozen_state()),
                        jax.random.key(0), jnp.zeros((), jnp.int32))
    assert loss.dtype == jnp.float32

