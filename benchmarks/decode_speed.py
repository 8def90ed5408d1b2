"""Cached image decoding speed of the DALL·E transformer: "sparse" vs "dense" cache reads.

    python benchmarks/decode_speed.py [--batch=4] [--sample_batches=1] [--repeats=3]

A CPU-sized model (d_model 512, 8 layers, 8 heads of 64, mlp 2048, vocabularies of 1024, all
flags) with random weights at the paper's stream (256 text + 32×32 image tokens), float32, one
CPU device. Times are best-of-N wall clock on a shared machine, the compared paths taking
turns; every ratio compares numbers measured in this run.

1. Image tokens/s: the jitted `sample_image_tokens` (prefill + a fori_loop of 1023 decode steps,
   temperature 1) drawing whole 32×32 images at each --sample_batches batch, best of
   --sample_repeats calls (default 1, no warm-up: a dense image takes ~2 minutes, and the
   per-token figures below are best-of --repeats), "sparse" vs "dense":
   tokens/s = batch·1024 / seconds.
2. Per-token time against position: one jitted `decode_step` (position a traced, so one
   compilation; the cache donated, so it is updated in place as in the loop) called at
   a = 1..31 (first image row) and a = 992..1022 (last row), at batch 1 and --batch: per
   position the best of --repeats calls, then each row's mean; ratio last row / first row.
3. Cached vs uncached: this model's forward always processes the full 1280-token stream, so
   drawing an image by recomputing the prefix at every step costs 1023 × the jitted
   `model(text, tokens)` (best of --repeats; the "sparse" training attention). Also given: a
   length-proportional estimate, Σ_a (256 + a + 1)/1280 × forward, the best a model taking
   shorter streams could do if time grew linearly with length. Speed-up = each of these
   uncached times / figure 1's whole-image time.
4. Compile: wall time of `jit(sampler).lower(...).compile()`; memory from
   `compiled.memory_analysis()` (argument + output + temp bytes); the KV cache is
   2 · depth · batch · 1280 · heads · head_dim · 4 bytes.
5. Memory-bandwidth bound: bytes read by a decode step = float32 parameters of the stack, final
   norm and image head (once per step, whatever the batch) + batch × the cache entries each
   layer reads (keys and values at 256 + its window positions for "sparse", all 1280 for
   "dense"); bandwidth = bytes / best time of a jitted jnp.sum over a --bandwidth_mb array;
   bound = bytes / bandwidth, achieved fraction = bound / figure 2's mean of both rows.
"""
import functools
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402

from common import best_of  # noqa: E402

flags.DEFINE_integer("d_model", 512, "Model width.")
flags.DEFINE_integer("depth", 8, "Transformer layers.")
flags.DEFINE_integer("num_heads", 8, "Attention heads.")
flags.DEFINE_integer("head_dim", 64, "Channels per head.")
flags.DEFINE_integer("mlp_dim", 2048, "MLP hidden width.")
flags.DEFINE_integer("text_length", 256, "Caption tokens.")
flags.DEFINE_integer("grid_size", 32, "Image side in tokens.")
flags.DEFINE_integer("text_vocab", 1024, "Text vocabulary.")
flags.DEFINE_integer("image_vocab", 1024, "Image vocabulary.")
flags.DEFINE_integer("batch", 4, "Second batch of the per-token figures (besides 1).")
flags.DEFINE_list("sample_batches", ["1"], "Batches at which whole images are drawn.")
flags.DEFINE_integer("repeats", 3, "Timed calls per decode step / forward (best is kept).")
flags.DEFINE_integer("sample_repeats", 1, "Timed whole-image draws per path (best is kept).")
flags.DEFINE_integer("bandwidth_mb", 256, "Size of the array summed to measure bandwidth.")
FLAGS = flags.FLAGS
IMPLEMENTATIONS = ("sparse", "dense")


def build_model():
    from dalle_jax import config_lib
    from dalle_jax.models import dalle

    config = config_lib.dalle_base_config()
    config.text.update(dict(length=FLAGS.text_length, vocab_size=FLAGS.text_vocab))
    config.model.update(dict(grid_size=FLAGS.grid_size, image_vocab_size=FLAGS.image_vocab,
                             d_model=FLAGS.d_model, num_heads=FLAGS.num_heads,
                             head_dim=FLAGS.head_dim, mlp_dim=FLAGS.mlp_dim, depth=FLAGS.depth))
    return dalle.DALLE(dalle.dalle_config(config.model, config.text, "float32"),
                       rngs=nnx.Rngs(0))


def random_inputs(cfg, batch: int):
    """(captions (B, T) of random ids after bos, image tokens (B, N))."""
    rng = np.random.default_rng(0)
    text = rng.integers(4, cfg.text_vocab_size, (batch, cfg.text_length)).astype(np.int32)
    text[:, 0] = 2
    tokens = rng.integers(0, cfg.image_vocab_size, (batch, cfg.image_length)).astype(np.int32)
    return jnp.asarray(text), jnp.asarray(tokens)


def read_bandwidth(megabytes: int, repeats: int) -> float:
    """Bytes/s of a jitted jnp.sum over a float32 array of `megabytes` MB."""
    x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return x.nbytes / best_of({"sum": lambda: total(x)}, repeats)["sum"]


def compile_sampler(graphdef, state, cfg, batch: int, implementation: str):
    """(run: no-arg call drawing `batch` images, compiled, seconds to lower and compile)."""
    from dalle_jax.sampling import decode

    text, _ = random_inputs(cfg, batch)
    args = (state, text, jax.random.split(jax.random.key(0), batch),
            decode.default_controls(batch))
    sample = jax.jit(lambda st, t, k, c: decode.sample_image_tokens(
        nnx.merge(graphdef, st), t, k, c, implementation=implementation))
    start = time.perf_counter()
    compiled = sample.lower(*args).compile()
    seconds = time.perf_counter() - start
    return functools.partial(compiled, *args), compiled, seconds


def memory_line(compiled) -> str:
    """argument + output + temp bytes of a compiled program, from XLA's memory analysis."""
    try:
        stats = compiled.memory_analysis()
        parts = [getattr(stats, f"{part}_size_in_bytes") / 2 ** 20
                 for part in ("argument", "output", "temp")]
    except (AttributeError, NotImplementedError, TypeError):
        return "memory_analysis unavailable"
    return f"{sum(parts):.1f} MiB (argument {parts[0]:.1f} + output {parts[1]:.3f} + temp " \
           f"{parts[2]:.1f})"


def position_times(graphdef, state, model, batch: int, repeats: int,
                   implementations=IMPLEMENTATIONS) -> dict:
    """{implementation: {"first"/"last": mean over the row of the best per-position time}}.

    The step reads the layers' weights as the sampling loop does: split once (outside the
    timing) by `decode_weights`, passed in."""
    def step(st, weights, token, a, cache, implementation):
        return nnx.merge(graphdef, st).decode_step(token, a, cache, implementation,
                                                   weights=weights)

    g, n = model.cfg.grid_size, model.cfg.image_length
    rows = {"first": list(range(1, g)), "last": list(range(n - g, n - 1))}
    token = jnp.zeros((batch,), jnp.int32)
    weights = jax.jit(lambda st: nnx.merge(graphdef, st).decode_weights())(state)
    steps, caches, best = {}, {}, {}
    for impl in implementations:
        steps[impl] = jax.jit(functools.partial(step, implementation=impl), donate_argnums=4)
        _, caches[impl] = steps[impl](state, weights, token, jnp.int32(1),
                                      model.init_cache(batch))
        best[impl] = {}
    for _ in range(repeats):
        for pair in zip(rows["first"], rows["last"]):  # the two rows and paths take turns
            for a in pair:
                for impl in implementations:
                    start = time.perf_counter()
                    logits, caches[impl] = steps[impl](state, weights, token, jnp.int32(a),
                                                       caches[impl])
                    jax.block_until_ready((logits, caches[impl]))
                    seconds = time.perf_counter() - start
                    best[impl][a] = min(best[impl].get(a, float("inf")), seconds)
    return {impl: {row: float(np.mean([best[impl][a] for a in positions]))
                   for row, positions in rows.items()} for impl in implementations}


def parameter_bytes(model) -> int:
    """float32 bytes of the parameters a decode step reads: stack, final norm, image head."""
    leaves = (jax.tree.leaves(nnx.state(model.stack, nnx.Param))
              + jax.tree.leaves(nnx.state(model.final_norm, nnx.Param))
              + [model.image_head[...]])
    return sum(x.size * x.dtype.itemsize for x in leaves)


def cache_read_bytes(model, batch: int, implementation: str) -> int:
    """Key + value bytes the decode step's cache reads take, summed over the layers."""
    from dalle_jax.models import attention as attention_lib

    b = model.cfg.block
    entries = sum(attention_lib.decode_read_length(kind, model.cfg.layout, implementation)
                  for kind in model.cfg.layer_kinds)
    return 2 * batch * entries * b.num_heads * b.head_dim * 4


def forward_seconds(graphdef, state, cfg, batch: int) -> float:
    forward = jax.jit(lambda st, text, tokens: nnx.merge(graphdef, st)(text, tokens))
    text, tokens = random_inputs(cfg, batch)
    seconds = best_of({"forward": lambda: forward(state, text, tokens)}, FLAGS.repeats)["forward"]
    print(f"[3] full forward ({cfg.layout.length} tokens, {cfg.attention} attention), batch "
          f"{batch}: {seconds * 1e3:.0f} ms")
    return seconds


def whole_images(graphdef, state, model, batch: int):
    """Figures 1, 3 and 4 at one batch."""
    cfg = model.cfg
    forward = forward_seconds(graphdef, state, cfg, batch)
    runs = {}
    for impl in IMPLEMENTATIONS:
        run, compiled, seconds = compile_sampler(graphdef, state, cfg, batch, impl)
        runs[impl] = run
        print(f"[4] compile sample_image_tokens, {impl}, batch {batch}: {seconds:.1f} s")
        print(f"[4] compiled memory, {impl}, batch {batch}: {memory_line(compiled)}")
    b = cfg.block
    kv = 2 * b.depth * batch * cfg.layout.length * b.num_heads * b.head_dim * 4
    print(f"[4] KV cache, batch {batch}: {kv / 2 ** 20:.1f} MiB")
    times = best_of(runs, FLAGS.sample_repeats, warm_up=False)
    n = cfg.image_length
    for impl in IMPLEMENTATIONS:
        print(f"[1] whole image, {impl}, batch {batch}: {times[impl]:.1f} s = "
              f"{batch * n / times[impl]:.1f} image tokens/s "
              f"({times[impl] / (n - 1) * 1e3:.1f} ms per decode step)")
    print(f"[1] throughput sparse / dense, batch {batch}: "
          f"{times['dense'] / times['sparse']:.2f}x (target >= 1.5)")
    t = cfg.text_length
    fixed = (n - 1) * forward
    proportional = sum((t + a + 1) / cfg.layout.length for a in range(n - 1)) * forward
    print(f"[3] uncached whole image, batch {batch}: {n - 1} x full forward = {fixed:.0f} s; "
          f"length-proportional estimate {proportional:.0f} s")
    for impl in IMPLEMENTATIONS:
        print(f"[3] cached speed-up, {impl}, batch {batch}: {fixed / times[impl]:.1f}x "
              f"(vs length-proportional: {proportional / times[impl]:.1f}x)")


def per_token(graphdef, state, model, batch: int, bandwidth: float):
    """Figures 2 and 5 at one batch."""
    rows = position_times(graphdef, state, model, batch, FLAGS.repeats)
    params = parameter_bytes(model)
    for impl in IMPLEMENTATIONS:
        first, last = rows[impl]["first"], rows[impl]["last"]
        print(f"[2] per-token time, {impl}, batch {batch}: first row {first * 1e3:.1f} ms, "
              f"last row {last * 1e3:.1f} ms, last / first {last / first:.2f}"
              + (" (target <= 1.25)" if impl == "sparse" else ""))
        cache = cache_read_bytes(model, batch, impl)
        bound = (params + cache) / bandwidth
        print(f"[5] bytes per step, {impl}, batch {batch}: {(params + cache) / 1e6:.1f} MB "
              f"(params {params / 1e6:.1f} + cache {cache / 1e6:.1f}) -> bound "
              f"{bound * 1e3:.1f} ms/token step, achieved {bound / ((first + last) / 2):.2f} of it")
    sparse, dense = (np.mean(list(rows[i].values())) for i in IMPLEMENTATIONS)
    print(f"[2] per-token time dense / sparse, batch {batch}: {dense / sparse:.2f}x")


def main(argv):
    del argv
    names = ("d_model", "depth", "num_heads", "head_dim", "mlp_dim", "text_length", "grid_size",
             "text_vocab", "image_vocab", "batch", "sample_batches", "repeats",
             "sample_repeats", "bandwidth_mb")
    print("command: python benchmarks/decode_speed.py " + " ".join(
        f"--{name}={','.join(v) if isinstance(v := FLAGS[name].value, list) else v}"
        for name in names))
    model = build_model()
    graphdef, state = nnx.split(model)
    bandwidth = read_bandwidth(FLAGS.bandwidth_mb, FLAGS.repeats + 2)
    print(f"[5] read bandwidth (jnp.sum over {FLAGS.bandwidth_mb} MB, 1 CPU device): "
          f"{bandwidth / 1e9:.2f} GB/s")
    for batch in sorted({1, FLAGS.batch}):
        per_token(graphdef, state, model, batch, bandwidth)
    for batch in sorted({int(b) for b in FLAGS.sample_batches}):
        whole_images(graphdef, state, model, batch)


if __name__ == "__main__":
    app.run(main)
