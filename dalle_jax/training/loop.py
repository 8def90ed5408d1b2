"""The one training loop: every model (dVAE, transformer, CLIP) trains here through a Task."""
from __future__ import annotations

import dataclasses
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from dalle_jax import files, workdir as workdir_lib
from dalle_jax.data import input_pipeline
from dalle_jax.sharding import logical
from dalle_jax.tasks.task import Task
from dalle_jax.training import checkpoint, metrics as metrics_lib, optimizer, setup
from dalle_jax.training import state as state_lib, step as step_lib


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class Preemption:
    """Turns SIGTERM (a pod's preemption notice) into a request to checkpoint and stop.

    With several processes every host must stop at the same step, so JAX's own preemption
    sync point (fed by the coordination service) decides there.
    """

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self):
        signal.signal(signal.SIGTERM, self._previous)


class StepProfiler:
    """Traces `count` train steps into <workdir>/profile (TensorBoard's profile tab or Perfetto
    read it), starting a few steps into the run so that compilation and warm-up stay out."""

    WARMUP_STEPS = 3

    def __init__(self, count: int, first_step: int, workdir: str):
        self.start = first_step + self.WARMUP_STEPS + 1
        self.stop = self.start + count - 1 if count > 0 else None
        self.directory = files.join(workdir, "profile")
        self.active = False
        self._mirror = None

    def step_starts(self, step: int) -> None:
        if self.stop is not None and step == self.start:
            self._mirror = files.LocalMirror(self.directory)  # the profiler writes local files
            jax.profiler.start_trace(self._mirror.path)
            self.active = True

    def step_dispatched(self, step: int, state) -> None:
        if self.active and step >= self.stop:
            jax.block_until_ready(state)  # The trace ends when the traced steps have run.
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self._mirror.close()
            self.active = False
            logging.info("profiler trace of steps %d-%d in %s", self.start, self.stop,
                         self.directory)


def flops_per_step(compiled) -> float:
    """FLOPs of one compiled step (per device), from XLA's cost analysis; 0 if unknown."""
    try:
        analysis = compiled.cost_analysis()
    except Exception:  # Some backends do not implement it.
        return 0.0
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", 0.0))


def _sum_trees(a, b):
    return b if a is None else jax.tree.map(jnp.add, a, b)


def place_frozen(task: Task, mesh, rules):
    """The task's frozen inputs (e.g. the transformer's dVAE) sharded by their logical axes
    like parameters; abstract ones become ShapeDtypeStructs with those shardings (planning);
    None for tasks without any."""
    frozen = task.frozen_state()
    if frozen is None:
        return None
    shardings = logical.state_shardings(frozen, mesh, rules)
    if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(frozen)):
        return state_lib.abstract_arrays(frozen, shardings)
    # Through the host: every process holds the whole (small) state and gives each of its
    # devices its part, which also works when the mesh spans several processes.
    host = jax.device_get(frozen)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
        host, shardings)


@dataclasses.dataclass
class StepPlan:
    """A run's train step before any data or device memory: the optimizer, where every array
    of the train state lives, and the step function. `Trainer` runs it and `dalle_jax.plan`
    compiles it for a pod's mesh from abstract arrays."""
    task: Task
    mesh: jax.sharding.Mesh
    rules: tuple
    tx: object
    schedule: Callable
    graphdef: nnx.GraphDef
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs with their target shardings
    init: Callable[[], state_lib.TrainState]
    train_step: Callable
    frozen: object  # the task's frozen inputs, placed (or abstract); None without any

    @property
    def shardings(self):
        return jax.tree.map(lambda a: a.sharding, self.abstract_state)

    def compile(self, state, batch):
        """The train step lowered and compiled for these arguments, concrete or abstract:
        explicit in/out shardings, the state donated."""
        batch_shardings, frozen_shardings = jax.tree.map(lambda x: x.sharding,
                                                         (batch, self.frozen))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.P())
        jitted = jax.jit(self.train_step,
                         in_shardings=(self.shardings, batch_shardings, frozen_shardings),
                         out_shardings=(self.shardings, replicated), donate_argnums=0)
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return jitted.lower(state, batch, self.frozen).compile()

    def flops_per_step(self, compiled, batch_size: int) -> float:
        """FLOPs of one step over all devices: the task's own count when it has one (XLA's
        cost analysis counts a scanned layer once, and every score block a mask removes),
        else XLA's per-device figure times the devices."""
        per_example = self.task.flops_per_example()
        if per_example is not None:
            return per_example * batch_size
        return flops_per_step(compiled) * self.mesh.size


def plan_step(config, task: Task, mesh: jax.sharding.Mesh) -> StepPlan:
    rules = logical.normalize_rules(config.sharding.rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.train.steps)
    graphdef, abstract_state, init = state_lib.plan_train_state(
        task, tx, mesh, rules, seed=config.seed, ema=config.optimizer.ema_decay > 0)
    return StepPlan(task=task, mesh=mesh, rules=rules, tx=tx, schedule=schedule,
                    graphdef=graphdef, abstract_state=abstract_state, init=init,
                    train_step=step_lib.make_train_step(task, tx, schedule, graphdef, config),
                    frozen=place_frozen(task, mesh, rules))


class Trainer:
    """Compiled steps and the data for one run; `train()` below is the entry point."""

    def __init__(self, config, workdir: str, task: Task, root: str | None = None):
        """`root`: the pipeline workdir this run is a stage of, if any."""
        self.config, self.workdir, self.task = config, workdir, task
        self.mesh, self.tokenizer = setup.setup(config, workdir, root)
        self.plan = plan_step(config, task, self.mesh)
        self.rules, self.graphdef = self.plan.rules, self.plan.graphdef
        self.abstract_state, self.frozen = self.plan.abstract_state, self.plan.frozen
        self.compiled_train_step = None
        self.flops_per_step = 0.0
        # Built once: a new function object per call would recompile at every evaluation.
        self._eval_step = self._under_mesh(step_lib.make_eval_step(task, self.graphdef))
        self._images_step = self._under_mesh(step_lib.make_images_step(task, self.graphdef))

    def init_state(self) -> state_lib.TrainState:
        """A fresh train state, every array created on the devices that own it."""
        return self.plan.init()

    def _under_mesh(self, fn):
        """`fn` jit-compiled, called with the mesh and rules active (they apply while tracing)."""
        jitted, mesh, rules = jax.jit(fn), self.mesh, self.rules

        def call(*args):
            with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
                return jitted(*args)

        return call

    def compile_train_step(self, state, batch):
        self.compiled_train_step = self.plan.compile(state, batch)
        self.flops_per_step = self.plan.flops_per_step(self.compiled_train_step,
                                                       self.config.data.batch_size)

    def train_step(self, state, batch):
        """One compiled step (compiled on first use): (new state, metrics)."""
        if self.compiled_train_step is None:
            self.compile_train_step(state, batch)
        return self.compiled_train_step(state, batch, self.frozen)

    def batches(self, split: str, training: bool) -> input_pipeline.GlobalBatches:
        images = not training or self.task.reads_training_images()
        return input_pipeline.global_batches(self.config, split, self.mesh, self.tokenizer,
                                             training=training, images=images)

    def evaluate(self, state) -> dict[str, float]:
        params = step_lib.eval_params(state)
        limit = self.config.train.eval_batches
        sums = None
        with self.batches(self.config.data.eval_split, training=False) as batches:
            for index, batch in enumerate(batches):
                if limit and index >= limit:
                    break
                sums = _sum_trees(sums, self._eval_step(params, state.rest, batch, self.frozen))
        metrics = self.task.summarize(jax.device_get(sums))
        return {**metrics, **self._evaluate_model(params, state.rest)}

    def _evaluate_model(self, params, rest) -> dict[str, float]:
        """The task's host-side evaluation of the whole model (e.g. CLIP's zero-shot
        accuracy). It feeds host arrays to the model, which a multi-process run cannot."""
        if jax.process_count() > 1:
            return {}
        model = nnx.merge(self.graphdef, params, rest)
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules):
            return self.task.evaluate_model(model, self.tokenizer)

    def image_grid(self, state, batch) -> np.ndarray | None:
        """The task's logged images of `batch`; None for a task that logs none."""
        grid = self._images_step(step_lib.eval_params(state), state.rest, batch, self.frozen)
        return None if grid is None else np.asarray(jax.device_get(grid))


def check_nonfinite(step: int, step_metrics, limit: int, workdir: str) -> None:
    if step_metrics is None:
        return
    in_row = int(step_metrics["nonfinite_in_row"])
    if in_row >= limit:
        raise NonFiniteError(
            f"step {step}: {in_row} non-finite losses or gradients in a row "
            f"(config.train.max_nonfinite_in_row={limit}); the last checkpoint is in "
            f"{workdir_lib.checkpoint_dir(workdir)}")


def _due(step: int, every: int, last: int) -> bool:
    """Every `every` steps and at the last one; never when `every` is 0."""
    return every > 0 and (step % every == 0 or step == last)


def train(config, workdir: str, task: Task, *, root: str | None = None,
          stop_after: int | None = None) -> state_lib.TrainState:
    """Trains `task` to `config.train.steps`, resuming from `workdir` if it has a checkpoint;
    returns the final train state. `root`: the pipeline workdir this run is a stage of.

    `stop_after` ends this call (with a checkpoint) after that many steps, e.g. to fit a job
    into a scheduler's time slot; a later call continues the same schedule.
    """
    trainer = Trainer(config, workdir, task, root)
    tcfg = config.train
    batches = trainer.batches(config.data.train_split, training=True)
    checkpoint.check_space(workdir, trainer.abstract_state)
    mgr = checkpoint.manager(workdir, keep=tcfg.keep_checkpoints, every=tcfg.checkpoint_every)
    if mgr.latest_step() is not None:
        state = checkpoint.restore_newest_readable(mgr, trainer.abstract_state, batches)
        logging.info("resumed from step %d of %s", int(state.step),
                     workdir_lib.checkpoint_dir(workdir))
    else:
        state = trainer.init_state()
    first_step = int(state.step)
    writer = metrics_lib.MetricWriter(workdir)
    preemption = Preemption()
    profiler = StepProfiler(config.profile_steps, first_step, workdir)
    image_batch = None
    # A few updates a minute: logs of batch jobs stay readable.
    progress = tqdm(total=tcfg.steps, initial=first_step, disable=jax.process_index() != 0,
                    desc=f"train {task.name}", dynamic_ncols=True, mininterval=10.0)
    try:
        interval_start, interval_steps = time.perf_counter(), 0
        pending_check = (first_step, None)
        for step in range(first_step + 1, tcfg.steps + 1):
            batch = next(batches)
            if trainer.compiled_train_step is None:
                trainer.compile_train_step(state, batch)
                interval_start = time.perf_counter()  # Compilation is not step time.
            profiler.step_starts(step)
            state, step_metrics = trainer.train_step(state, batch)
            profiler.step_dispatched(step, state)
            interval_steps += 1
            progress.update(1)
            # Checked one step late, so the host never waits for the step it just dispatched.
            check_nonfinite(*pending_check, tcfg.max_nonfinite_in_row, workdir)
            pending_check = (step, step_metrics)
            if _due(step, tcfg.log_every, tcfg.steps):
                seconds = (time.perf_counter() - interval_start) / interval_steps
                values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
                values.update(step_seconds=seconds,
                              examples_per_second=config.data.batch_size / seconds,
                              flops_per_second=trainer.flops_per_step / seconds)
                writer.scalars(step, values, prefix="train/")
                progress.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
                interval_start, interval_steps = time.perf_counter(), 0
            if _due(step, tcfg.eval_every, tcfg.steps):
                writer.scalars(step, trainer.evaluate(state), prefix="eval/")
            if _due(step, tcfg.images_every, tcfg.steps):
                if image_batch is None:  # The same images every time, so grids compare.
                    with trainer.batches(config.data.eval_split, training=False) as eval_batches:
                        image_batch = next(eval_batches)
                grid = trainer.image_grid(state, image_batch)
                if grid is not None:
                    writer.image(step, task.name, grid)
            stop = preemption.should_stop(step) or (
                stop_after is not None and step - first_step >= stop_after)
            checkpoint.save(mgr, step, state, batches, force=stop or step == tcfg.steps)
            if stop:
                logging.warning("checkpointed step %d and stopped before the end of training", step)
                break
        check_nonfinite(*pending_check, tcfg.max_nonfinite_in_row, workdir)
    finally:
        profiler.close()
        progress.close()
        preemption.close()
        mgr.wait_until_finished()
        mgr.close()
        batches.close()
        writer.close()
    return state
