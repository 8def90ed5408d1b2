"""Sparse vs dense-masked attention at the paper's sequence: forward + backward time per kind.

    python benchmarks/sparse_attention.py [--batch=4] [--heads=8] [--head_dim=64] [--text_len=256]
                                          [--grid=32] [--repeats=5]

Times jax.grad of sum(attention(q, k, v)) wrt q, k, v, jit-compiled, float32, on one CPU
device: best of `repeats` calls after one warm-up call, dense and sparse calls taking turns.
The "mix" is the paper's group of four layers (row, column, row, row: 3 row : 1 column),
chained and timed as one function, and also derived from the per-kind times. Also prints the
score FLOPs each path computes (QKᵀ and PV of the forward pass, 4·batch·heads·head_dim per
score) next to the scores the mask keeps, and XLA's FLOP count of each compiled fwd + bwd.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from common import best_of  # noqa: E402
from dalle_jax.models import attention as attn  # noqa: E402

flags.DEFINE_integer("batch", 4, "Sequences per call.")
flags.DEFINE_integer("heads", 8, "Attention heads.")
flags.DEFINE_integer("head_dim", 64, "Channels per head.")
flags.DEFINE_integer("text_len", 256, "Text positions.")
flags.DEFINE_integer("grid", 32, "Image side in tokens (grid x grid).")
flags.DEFINE_integer("conv_kernel", 11, "Side of the conv layer's neighbourhood.")
flags.DEFINE_integer("repeats", 5, "Timed calls per path (best is reported).")
FLAGS = flags.FLAGS


def best_seconds(fns, args, repeats: int) -> list[float]:
    """Fastest call of each fn(*args), the fns taking turns (see common.best_of)."""
    times = best_of({i: (lambda fn=fn: fn(*args)) for i, fn in enumerate(fns)}, repeats)
    return [times[i] for i in range(len(fns))]


def forward_backward(kinds, layout, implementation, qkv):
    """The compiled grad wrt q, k, v of sum(outputs), and XLA's FLOP count of it.

    Several kinds are chained (each output is the next layer's queries), so XLA cannot merge
    the repeated layers of a group into one.
    """
    def loss(q, k, v):
        for kind in kinds:
            q = attn.attention(q, k, v, kind, layout, implementation)
        return q.sum()

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*qkv).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return compiled, float((analysis or {}).get("flops", 0.0))


def main(argv):
    del argv
    print(f"command: python benchmarks/sparse_attention.py --batch={FLAGS.batch} "
          f"--heads={FLAGS.heads} --head_dim={FLAGS.head_dim} --text_len={FLAGS.text_len} "
          f"--grid={FLAGS.grid} --conv_kernel={FLAGS.conv_kernel} --repeats={FLAGS.repeats}")
    layout = attn.Layout(FLAGS.text_len, FLAGS.grid, FLAGS.grid, FLAGS.conv_kernel)
    shape = (FLAGS.batch, layout.length, FLAGS.heads, FLAGS.head_dim)
    rng = np.random.default_rng(0)
    qkv = [jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(3)]
    print(f"layout: text {layout.text_len} + {layout.grid_h}x{layout.grid_w} image "
          f"(L = {layout.length}), q/k/v {shape} float32, forward+backward, 1 CPU device "
          f"of {os.cpu_count()} cores; row block {attn.ROW_BLOCK}, conv block "
          f"{attn.CONV_ROWS} image row(s)")
    per_score = 4 * FLAGS.batch * FLAGS.heads * FLAGS.head_dim
    times = {}
    for kind in attn.SPARSE_KINDS:
        kept = attn.kept_score_count(kind, layout)
        compiled = {impl: forward_backward((kind,), layout, impl, qkv)
                    for impl in ("dense", "sparse")}
        seconds = best_seconds([compiled[impl][0] for impl in ("dense", "sparse")], qkv,
                               FLAGS.repeats)
        for impl, time_ in zip(("dense", "sparse"), seconds):
            times[kind, impl], xla_flops = time_, compiled[impl][1]
            scores = attn.computed_score_count(kind, layout, impl)
            print(f"  {kind:6s} {impl:6s}: {times[kind, impl] * 1e3:8.1f} ms | scores computed "
                  f"{scores:>9,} ({scores / kept:4.2f}x kept {kept:,}) = "
                  f"{scores * per_score / 1e9:6.2f} GFLOP forward | XLA fwd+bwd "
                  f"{xla_flops / 1e9:6.2f} GFLOP")
        print(f"{kind:6s} speed-up sparse over dense: "
              f"{times[kind, 'dense'] / times[kind, 'sparse']:.2f}x")
    group = ("row", "column", "row", "row")
    mix = best_seconds([forward_backward(group, layout, impl, qkv)[0]
                        for impl in ("dense", "sparse")], qkv, FLAGS.repeats)
    print(f"mix: the paper's group {group} (3 row : 1 column) chained, measured: dense "
          f"{mix[0] * 1e3:.1f} ms, sparse {mix[1] * 1e3:.1f} ms -> speed-up {mix[0] / mix[1]:.2f}x")
    derived = [(3 * times["row", impl] + times["column", impl]) for impl in ("dense", "sparse")]
    print(f"mix from the per-kind times above (3 row + 1 column): speed-up "
          f"{derived[0] / derived[1]:.2f}x")


if __name__ == "__main__":
    app.run(main)
