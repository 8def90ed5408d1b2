"""One process of a multi-process input-pipeline run (started by test_multiprocess.py).

argv: process_id num_processes port data_dir workdir out.npz
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402


def main(process_id, num_processes, port, data_dir, workdir, out):
    from dalle_jax import config_lib
    from dalle_jax.training import setup
    from dalle_jax.data import input_pipeline

    config = config_lib.base_config()
    config.data.data_dir = data_dir
    config.data.shapes.update(dict(num_train=300, num_validation=100, num_heldout=60))
    config.mesh.shape = (2, 4, 1)
    config.distributed.update(dict(
        enabled=True, coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
        process_id=process_id, cpu_collectives="gloo"))
    mesh, tokenizer = setup.setup(config, workdir)
    assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes
    with input_pipeline.global_batches(config, "train", mesh, tokenizer, training=True) as batches:
        gathered = [multihost_utils.process_allgather(next(batches), tiled=True) for _ in range(2)]
    np.savez(out, **{f"{k}{i}": np.asarray(v) for i, b in enumerate(gathered) for k, v in b.items()})
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, n, port = (int(a) for a in sys.argv[1:4])
    main(pid, n, port, *sys.argv[4:7])
