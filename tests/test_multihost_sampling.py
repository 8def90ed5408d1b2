"""Sampling as a pod runs it: `sample.py` started on every process of a multi-process job.

Two local processes with 4 CPU devices each (jax.distributed over loopback, gloo collectives)
restore the tiny transformer onto one mesh over their 8 devices (images over `data`, heads
over `tensor`), draw together, and process 0 writes; the reference is one process with 8
devices on the same mesh shape. The images must be the same to the byte.
"""
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from test_multiprocess import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = ["--prompt=a red circle", "--prompt=a blue square above a green circle", "--n=4",
          "--batch_size=4", "--temperature=0.8", "--seed=1", "--mesh_shape=2,1,4"]


def start(args, devices: int):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), *args], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish(process) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def test_two_processes_draw_the_images_of_one(dalle_run, tmp_path):
    port = free_port()
    two = [start([f"--workdir={dalle_run}", f"--out={tmp_path / 'two'}", *SAMPLE,
                  "--distributed", f"--coordinator_address=127.0.0.1:{port}",
                  "--num_processes=2", f"--process_id={i}", "--cpu_collectives=gloo"], 4)
           for i in range(2)]
    one = start([f"--workdir={dalle_run}", f"--out={tmp_path / 'one'}", *SAMPLE], 8)
    outputs = [finish(p) for p in (*two, one)]
    for i in range(2):
        assert f"process {i} of 2, 4 local devices of 8" in outputs[i]
    assert "images in" in outputs[0] and "images in" not in outputs[1]  # process 0 writes
    files = sorted(os.listdir(tmp_path / "one"))
    assert files == sorted(os.listdir(tmp_path / "two")) and len(files) == 8 + 2 + 1
    for name in files:
        if name.endswith(".png"):
            np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "two" / name)),
                                          np.asarray(Image.open(tmp_path / "one" / name)))
    records = [json.loads((tmp_path / d / "samples.json").read_text()) for d in ("one", "two")]
    assert records[0]["images"] == records[1]["images"]
