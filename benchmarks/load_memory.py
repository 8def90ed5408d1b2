"""Peak host memory of loading a trained transformer for inference, over its parameters' bytes.

    python benchmarks/load_memory.py [--depth=4] [--workdir=DIR]

Writes the checkpoint a training run of `configs/dalle_small.py` (at `--depth` layers, float32)
would leave: the whole train state, so parameters, their EMA and both Adam moments. Then, each
in a fresh process, it loads the model as sampling does (`workdir.Run.load_model`: the EMA
copy and the non-parameter variables only) and, as the reference measured in the same run, the
whole train state as resuming training does. Peak memory is the process's peak resident set
(VmHWM, reset just before the load) minus its resident set before the load, over the bytes of
the loaded parameters.
"""
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from dalle_jax import cli  # noqa: E402

flags.DEFINE_integer("depth", 4, "Layers of configs/dalle_small.py's transformer (12 in full).")
flags.DEFINE_string("workdir", "", "Where to write the checkpoint (default: a temporary one).")
flags.DEFINE_string("measure", "", "Internal: measure one load ('model' or 'train_state').")
FLAGS = flags.FLAGS


def config_of(depth: int):
    from dalle_jax import config_lib

    config = config_lib.load("dalle_small")
    config.model.depth = depth
    config.model.remat = "none"
    config.train.compute_dtype = "float32"
    config.mesh.update(dict(shape=(1, 1, 1), num_devices=1))
    return config


def training_plan(config):
    """The training loop's own plan of the run's train state (with a dVAE of the paper's
    shapes, which the state does not contain)."""
    from dalle_jax import config_lib, plan, tasks
    from dalle_jax.sharding import mesh as mesh_lib
    from dalle_jax.training import loop

    dvae = plan.abstract_dvae(config_lib.load("dvae"), config.train.compute_dtype)
    task = tasks.get_task(config, dvae=dvae)
    return loop.plan_step(config, task, mesh_lib.build_mesh(config.mesh))


def write_workdir(workdir: str, config) -> None:
    from dalle_jax import workdir as workdir_lib
    from dalle_jax.training import checkpoint

    os.makedirs(workdir, exist_ok=True)
    workdir_lib.write_config(config, workdir)
    checkpoint.save_state(workdir, 1, training_plan(config).init())


def resident_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(workdir: str, what: str) -> dict:
    """In this process: (peak - before) bytes of one load, and the loaded parameters' bytes."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import nnx

    from dalle_jax import workdir as workdir_lib
    from dalle_jax.models import dalle

    jax.block_until_ready(jnp.zeros(1) + 1)  # the runtime is up before the baseline
    run = workdir_lib.Run(workdir, expect="dalle")
    plan = training_plan(run.config) if what == "train_state" else None
    before = resident_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    if what == "model":
        loaded = nnx.state(run.load_model(dalle.from_config), nnx.Param)
    else:
        path = os.path.join(workdir_lib.checkpoint_dir(workdir), "1", workdir_lib.STATE)
        loaded = ocp.StandardCheckpointer().restore(path, plan.abstract_state).ema
    jax.block_until_ready(loaded)
    peak = resident_kib("VmHWM")
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(loaded))
    return {"peak_bytes": (peak - before) * 1024, "param_bytes": param_bytes}


def main(argv):
    del argv
    if FLAGS.measure:
        print(json.dumps(measure(FLAGS.workdir, FLAGS.measure)))
        return
    print(f"command: python benchmarks/load_memory.py --depth={FLAGS.depth}")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = FLAGS.workdir or os.path.join(scratch, "dalle_small")
        write_workdir(workdir, config_of(FLAGS.depth))
        results = {}
        for what in ("model", "train_state"):
            out = subprocess.run([sys.executable, __file__, f"--workdir={workdir}",
                                  f"--measure={what}"], capture_output=True, text=True,
                                 check=True)
            results[what] = json.loads(out.stdout.strip().splitlines()[-1])
    params = results["model"]["param_bytes"]
    print(f"configs/dalle_small.py at depth {FLAGS.depth}, float32: {params / 2**20:.1f} MiB "
          "of parameters")
    for what, label in (("model", "load for inference (Run.load_model)"),
                        ("train_state", "reference: the whole train state")):
        peak = results[what]["peak_bytes"]
        print(f"  {label:40s} peak {peak / 2**20:8.1f} MiB = {peak / params:.2f}x the "
              "parameters")


if __name__ == "__main__":
    cli.run(main)
