"""Where a decode step's time goes: the whole-image loop against its bounds, op by op.

    python benchmarks/decode_profile.py [--d_model=512 --depth=8 --text_length=64 \
        --grid_size=16 --text_vocab=16384 --image_vocab=8192] [--batches=1,8,32,128]

The model flags are `decode_speed.py`'s (random weights, float32, one CPU device, "sparse"
cache reads). Per batch:
- the isolated decode step (`DALLE.decode_step` jitted alone, the cache donated; mean over the
  first image row's positions) and the whole-image loop's step (the best of --repeats
  `sample_image_tokens` calls at temperature 1 divided by its N-1 steps; the prefill is left
  in, a few steps' worth);
- the weight matmuls alone: the step's matmuls (fused q/k/v, out, MLP, image head) chained
  at the same batch with nothing else, what this CPU's matmul kernels take for its weights;
- the step's bounds: bytes it must read (parameters once, plus each layer's cache entries per
  example) over the read bandwidth of a jitted `jnp.sum`, and FLOPs (2 per multiply-add of the
  stack's matmuls and the image head, plus attention over the entries read) over the fp32
  2048³ matmul's FLOP/s, both measured in this run; the step as a multiple of the larger bound;
- the loop traced under XLA:CPU's per-operation events: per step, the time of each kind of
  operation and the longest operations (output shape, what they compute, where from).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xla_trace  # noqa: E402

xla_trace.enable_operation_events()
import decode_speed  # noqa: E402  (the model flags and builders)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from common import best_of, matmul_flops_per_second  # noqa: E402

flags.DEFINE_list("batches", ["1", "8", "32", "128"], "Batches profiled.")
flags.DEFINE_integer("top", 10, "Longest operations listed per batch.")
flags.DEFINE_boolean("trace", True, "Trace the loop's operations (else times and bounds only).")
FLAGS = flags.FLAGS


def step_flops(model, batch: int) -> float:
    """Multiply-add FLOPs of one decode step: matmuls of the stack and head, attention reads."""
    from dalle_jax.models import attention as attention_lib

    cfg, b = model.cfg, model.cfg.block
    matmul_params = sum(x.size for x in jax.tree.leaves(nnx.state(model.stack, nnx.Param))
                        if x.ndim >= 3)  # [layers, in, out...]: weights, not norms or biases
    entries = sum(attention_lib.decode_read_length(kind, cfg.layout) for kind in cfg.layer_kinds)
    attention = 4 * b.num_heads * b.head_dim * entries
    return batch * (2 * (matmul_params + model.image_head[...].size) + attention)


def matmuls_alone(graphdef, state, model, batch: int) -> float:
    """Seconds of the step's weight matmuls and nothing else: per layer, x @ the fused q/k/v,
    @ out, @ MLP up, @ MLP down, then the image head, each feeding the next, on the weights the
    loop reads (`decode_weights`) at this batch: what this CPU's matmul kernels take for the
    step's weights at these shapes (best of --repeats)."""
    weights = jax.jit(lambda st: nnx.merge(graphdef, st).decode_weights())(state)
    head = model.image_head[...]

    @jax.jit
    def chain(x, weights, head):
        for layer in weights:
            out, mlp = layer.block["attention"]["out"][...], layer.block["mlp"]
            inner = out.shape[0] * out.shape[1]  # heads · head_dim
            x = x + (x @ layer.qkv)[:, :inner] @ out.reshape(inner, -1)
            x = x + jax.nn.gelu(x @ mlp["up"][...]) @ mlp["down"][...]
        return x @ head

    x = jax.numpy.ones((batch, model.cfg.block.d_model))
    return best_of({"chain": lambda: chain(x, weights, head)}, FLAGS.repeats + 2)["chain"]


def profile(graphdef, state, model, batch: int, bandwidth: float, matmul: float) -> None:
    cfg = model.cfg
    steps = cfg.image_length - 1
    run, compiled, _ = decode_speed.compile_sampler(graphdef, state, cfg, batch, "sparse")
    loop = best_of({"loop": run}, FLAGS.repeats)["loop"] / steps
    isolated = decode_speed.position_times(graphdef, state, model, batch, FLAGS.repeats,
                                           ("sparse",))["sparse"]["first"]
    read = decode_speed.parameter_bytes(model) + decode_speed.cache_read_bytes(
        model, batch, "sparse")
    memory_bound, flops = read / bandwidth, step_flops(model, batch)
    compute_bound = flops / matmul
    bound = max(memory_bound, compute_bound)
    alone = matmuls_alone(graphdef, state, model, batch)
    print(f"\n## batch {batch}: loop step {loop * 1e3:.2f} ms, isolated step "
          f"{isolated * 1e3:.2f} ms (loop / isolated {loop / isolated:.2f}); the weight "
          f"matmuls alone {alone * 1e3:.2f} ms (loop / them {loop / alone:.2f})\n")
    print(f"bounds: memory {memory_bound * 1e3:.2f} ms ({read / 1e6:.1f} MB), compute "
          f"{compute_bound * 1e3:.2f} ms ({flops / 1e9:.3f} GFLOP); loop step / larger bound "
          f"{loop / bound:.2f}, isolated / larger bound {isolated / bound:.2f}; loop FLOP/s "
          f"{flops / loop / matmul:.3f} of matmul")
    if not FLAGS.trace:
        return
    with xla_trace.traced_operations() as seconds:
        jax.block_until_ready(run())
    hlo = compiled.as_text()
    total = sum(seconds.values()) / steps
    print(f"\nXLA operations per step, summed: {total * 1e3:.2f} ms\n")
    print("| kind of operation | ms a step | share |\n|---|---|---|")
    for name, s in xla_trace.by_kind(seconds).most_common(10):
        print(f"| {name} | {s / steps * 1e3:.3f} | {s / steps / total:.2f} |")
    print("\n| longest operations | ms a step | output, computes, from |\n|---|---|---|")
    for name, s in seconds.most_common(FLAGS.top):
        print(f"| {name} | {s / steps * 1e3:.3f} | {xla_trace.describe(name, hlo)} |")


def main(argv):
    del argv
    model = decode_speed.build_model()
    graphdef, state = nnx.split(model)
    bandwidth = decode_speed.read_bandwidth(FLAGS.bandwidth_mb, FLAGS.repeats + 2)
    matmul = matmul_flops_per_second()
    cfg = model.cfg
    print(f"model: d_model {cfg.block.d_model}, depth {cfg.block.depth}, text "
          f"{cfg.text_length} + grid {cfg.grid_size}x{cfg.grid_size}, vocab "
          f"{cfg.text_vocab_size} / {cfg.image_vocab_size}; read bandwidth "
          f"{bandwidth / 1e9:.2f} GB/s, fp32 matmul {matmul / 1e9:.1f} GFLOP/s")
    for batch in [int(b) for b in FLAGS.batches]:
        profile(graphdef, state, model, batch, bandwidth, matmul)
    print("\ncommand: python benchmarks/decode_profile.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    app.run(main)
