"""The optimizer: AdamW with global-norm clipping and a warm-up + decay schedule, all Optax."""
from __future__ import annotations

import jax
import optax

SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine / linear decay or a constant."""
    if opt_config.schedule not in SCHEDULES:
        raise ValueError(f"config.optimizer.schedule={opt_config.schedule!r} must be one of "
                         f"{SCHEDULES}")
    peak, end, warmup = opt_config.learning_rate, opt_config.end_learning_rate, opt_config.warmup_steps
    if warmup >= total_steps and opt_config.schedule != "constant":
        raise ValueError(f"config.optimizer.warmup_steps={warmup} leaves no decay before "
                         f"config.train.steps={total_steps}")
    decay_steps = max(1, total_steps - warmup)
    if opt_config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak if peak else 0.0)
    elif opt_config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on matrices and kernels only: not on biases, gains or embeddings' norms."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt_config, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt_config, total_steps)
    parts = []
    if opt_config.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(opt_config.clip_norm))
    parts.append(optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                             weight_decay=opt_config.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
