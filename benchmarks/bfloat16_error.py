"""How far bfloat16 compute lands from float32, for every model: the figures behind the
tolerances of tests/test_bfloat16.py.

    python benchmarks/bfloat16_error.py

From the same float32 parameters and data (the test's tiny models): the relative difference of
the losses of three AdamW steps and of the gradients at the start, of the transformer's logits
(over the largest logit) and of each sparse attention kind's output, with the test's tolerance
beside each; and for sampling in bf16 (tests/test_sampling.py), the cached decode's logits
against the bf16 model's teacher-forced forward, and how many greedy images equal float32's.
The reference is the float32 run of the same computation.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import test_bfloat16 as t  # noqa: E402
import test_sampling  # noqa: E402
from flax import nnx  # noqa: E402

from dalle_jax.models import dalle  # noqa: E402


def main():
    print("command: python benchmarks/bfloat16_error.py")
    print("model   loss (max over 3 steps)   gradients      (tolerances)")
    for name in ("dvae", "dalle", "clip"):
        losses32, grads32, params = t.losses_and_first_grads(name, "float32")
        losses16, grads16, _ = t.losses_and_first_grads(name, t.BF16, params)
        flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)])
                for g in (grads32, grads16)]
        loss = np.max(np.abs(losses16 - losses32) / np.abs(losses32))
        grads = np.linalg.norm(flat[1] - flat[0]) / np.linalg.norm(flat[0])
        print(f"{name:6s}  {loss:.2e}                  {grads:.2e}       "
              f"({t.LOSS_RTOL[name]:g}, {t.GRAD_RTOL[name]:g})")
    text = t.captions(t.small_dalle_config(), [2, 3])
    tokens = t.image_tokens(t.small_dalle_config(), 2)
    for name, ours, ref in zip(("text", "image"), t.small_dalle(t.BF16)(text, tokens),
                               t.small_dalle("float32")(text, tokens)):
        print(f"{name} logits: {float(jnp.max(jnp.abs(ours - ref)) / jnp.max(jnp.abs(ref))):.2e}"
              f" of the largest logit (tolerance {t.LOGITS_RTOL:g})")
    layout = t.attn.Layout(6, 4, 4, 3)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, layout.length, 2, 8)) for i in range(3))
    for kind in ("row", "column", "conv"):
        ref = t.attn.attention(q, k, v, kind, layout)
        ours = t.attn.attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), kind, layout)
        print(f"{kind} attention: max |difference| "
              f"{float(jnp.max(jnp.abs(ours.astype(jnp.float32) - ref))):.4f} "
              f"(tolerance {t.ATTENTION_ATOL:g})")

    cfg = t.small_dalle_config()
    small = (cfg, dalle.DALLE(cfg, rngs=t.fast_rngs()))
    model = test_sampling.for_inference(small, t.BF16)
    _, forced = nnx.jit(lambda m, a, b: m(a, b))(model, text, tokens)
    cached = test_sampling.cached_logits(model, text, tokens, "sparse")
    print(f"bf16 cached decode against its teacher-forced forward: max |difference| "
          f"{float(jnp.max(jnp.abs(cached - forced))):.4f}, largest logit "
          f"{float(jnp.max(jnp.abs(forced))):.3f} (tolerance "
          f"{test_sampling.CACHED_ATOL['bfloat16']:g})")
    text = t.captions(cfg, [1, 2, 3, 4, 2, 1])
    seeds = list(range(len(text)))
    ours = test_sampling.sample(model, text, seeds, temperature=0.0)
    ref = test_sampling.sample(small[1], text, seeds, temperature=0.0)
    print(f"greedy images equal to float32's: {int((ours == ref).all(axis=1).sum())} of "
          f"{len(text)}")


if __name__ == "__main__":
    main()
