"""Two real processes over loopback build one global batch from their disjoint halves."""
import os
import socket
import subprocess
import sys

import numpy as np

from dalle_jax.data import input_pipeline
from dalle_jax.text.tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_assemble_the_global_batch_from_their_shards(mini_config, tmp_path):
    config = mini_config()
    workdir, port = str(tmp_path / "run"), free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "multiprocess_worker.py"), str(i), "2", str(port),
         config.data.data_dir, workdir, str(tmp_path / f"out{i}.npz")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]

    outputs = [np.load(tmp_path / f"out{i}.npz") for i in range(2)]
    # The reference: each process's host-local loader, run here in one process.
    config.mesh.shape = (2, 4, 1)
    tokenizer = Tokenizer(os.path.join(workdir, "tokenizer.model"))
    local = [[b for _, b in zip(range(2), input_pipeline.make_loader(
        config, "train", tokenizer, training=True, process_index=i, process_count=2))]
        for i in range(2)]
    for step in range(2):
        for key in ("image", "text", "mask"):
            expected = np.concatenate([local[0][step][key], local[1][step][key]])
            for out in outputs:
                np.testing.assert_array_equal(out[f"{key}{step}"], expected)
    assert not set(map(bytes, local[0][0]["image"])) & set(map(bytes, local[1][0]["image"]))
