"""The jit-compiled steps: training (with accumulation, EMA and non-finite skipping), evaluation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dalle_jax.training.state import TrainState


def split_micro_batches(x: jax.Array, count: int) -> jax.Array:
    """(B, ...) -> (count, B/count, ...), each micro-batch taking every count-th example.

    Strided rather than contiguous, so every micro-batch stays spread over all the devices
    that hold the batch.
    """
    if x.shape[0] % count:
        raise ValueError(f"batch of {x.shape[0]} does not split into config.train.grad_accum="
                         f"{count} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // count, count) + x.shape[1:]), 0, 1)


def with_frozen(batch: dict, frozen) -> dict:
    """The batch as tasks see it: with the task's frozen inputs (if any) under 'frozen'."""
    return batch if frozen is None else dict(batch, frozen=frozen)


def make_train_step(task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    graphdef, config):
    accum = config.train.grad_accum
    ema_decay = config.optimizer.ema_decay
    base_key = jax.random.key(config.seed)

    def loss_fn(params, rest, batch, rng, step, frozen):
        return task.loss(nnx.merge(graphdef, params, rest), with_frozen(batch, frozen), rng, step)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def loss_metrics_grads(state: TrainState, batch, rng, frozen):
        if accum == 1:
            (loss, metrics), grads = grad_fn(state.params, state.rest, batch, rng, state.step,
                                             frozen)
            return loss, metrics, grads

        micro = jax.tree.map(lambda x: split_micro_batches(x, accum), batch)

        def one(index, micro_batch):
            (loss, metrics), grads = grad_fn(state.params, state.rest, micro_batch,
                                             jax.random.fold_in(rng, index), state.step, frozen)
            return loss, metrics, grads

        def accumulate(total, inputs):
            return jax.tree.map(jnp.add, total, one(*inputs)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(one, 0, first))
        total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
        return jax.tree.map(lambda x: x / accum, total)

    def train_step(state: TrainState, batch, frozen=None):
        rng = jax.random.fold_in(base_key, state.step)
        loss, metrics, grads = loss_metrics_grads(state, batch, rng, frozen)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)

        def keep_if_finite(new, old):
            # A non-finite step changes nothing but the counters: the batch is skipped.
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        bad = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            ema=None if ema is None else keep_if_finite(ema, state.ema),
            nonfinite_total=state.nonfinite_total + bad,
            nonfinite_in_row=(state.nonfinite_in_row + bad) * bad,
        )
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                       learning_rate=schedule(state.step),
                       nonfinite_total=new_state.nonfinite_total,
                       nonfinite_in_row=new_state.nonfinite_in_row)
        return new_state, metrics

    return train_step


def eval_params(state: TrainState) -> nnx.State:
    """The parameters a run is judged and used by: the EMA when there is one."""
    return state.params if state.ema is None else state.ema


def make_eval_step(task, graphdef):
    def eval_step(params, rest, batch, frozen=None):
        return task.eval_sums(nnx.merge(graphdef, params, rest), with_frozen(batch, frozen))

    return eval_step


def make_images_step(task, graphdef):
    def images_step(params, rest, batch, frozen=None):
        return task.log_images(nnx.merge(graphdef, params, rest), with_frozen(batch, frozen))

    return images_step
