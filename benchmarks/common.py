"""What every benchmark here shares: timing on a shared machine and the matmul reference.

Speeds are reported as ratios to this machine's fp32 matmul FLOP/s measured in the same run,
because the machines are shared and their absolute speed drifts.
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def best_of(fns: dict, repeats: int, warm_up: bool = True) -> dict:
    """Fastest of `repeats` calls of each zero-argument fn, the fns taking turns.

    Best-of is the time least disturbed by other work on a shared machine; taking turns
    exposes the paths being compared to the same disturbances.
    """
    if warm_up:
        for fn in fns.values():
            jax.block_until_ready(fn())
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def mean_seconds(fn, *args, repeats: int) -> float:
    """Seconds per call of `fn(*args)` over `repeats` calls after one warm-up call."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def matmul_flops_per_second(n: int = 2048, repeats: int = 10) -> float:
    """fp32 FLOP/s of an n×n by n×n matmul on the default device: the speed reference."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    return 2 * n ** 3 / mean_seconds(matmul, a, a, repeats=repeats)
