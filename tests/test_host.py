"""The commands' host process: glibc's malloc with huge pages, set by starting again once."""
import os
import subprocess
import sys

import pytest

from dalle_jax import host

# Steps of a jitted function whose temporaries (36 MB arrays, larger than glibc ever serves
# from a heap) are allocated and freed at every call; prints the minor page faults per step
# after a warm-up.
STEPS = """
import resource
import jax, jax.numpy as jnp
step = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x) + jnp.tanh(x)).sum(axis=0))
x = jnp.ones((3000, 3000), jnp.float32)
for _ in range(5):
    step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""

needs_glibc_tunable = pytest.mark.skipif(
    (host.glibc_version() or (0,)) < host.GLIBC_WITH_TUNABLE,
    reason="glibc 2.35 or newer only (the hugetlb tunable)")


def faults_per_step(environ) -> float:
    env = dict(environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", STEPS], capture_output=True, text=True,
                         check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


@needs_glibc_tunable
def test_huge_pages_remove_most_page_faults_of_every_step():
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    default = faults_per_step(plain)
    huge = faults_per_step(host.environment_with_huge_pages(plain))
    # Each 36 MB temporary is about 9,000 fresh pages of 4 KiB a step; in 2 MiB pages, 18.
    assert default > 9000, default
    assert huge < default / 10, (huge, default)


# A command: prints the tunables it runs with and how often its script started.
COMMAND = """
import os, sys
from dalle_jax import cli
print("started", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
cli.run(lambda argv: print("main", argv[1:], flush=True))
"""


def run_command(tmp_path, environ) -> list[str]:
    script = tmp_path / "command.py"
    script.write_text(COMMAND)
    out = subprocess.run([sys.executable, str(script), "--", "x"], capture_output=True,
                         text=True, check=True, env=environ)
    return out.stdout.splitlines()


@needs_glibc_tunable
def test_a_command_starts_again_once_with_the_tunable_and_its_arguments(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    environ["GLIBC_TUNABLES"] = "glibc.malloc.check=0"  # the user's own tunables are kept
    assert run_command(tmp_path, environ) == [
        "started glibc.malloc.check=0",
        "started glibc.malloc.check=0:glibc.malloc.hugetlb=1",
        "main ['x']"]


def test_a_command_runs_once_when_asked_not_to_or_already_set(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert run_command(tmp_path, dict(environ, DALLE_JAX_HUGE_PAGES="0")) == [
        "started ", "main ['x']"]
    assert run_command(tmp_path, dict(environ, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")) == [
        "started glibc.malloc.hugetlb=0", "main ['x']"]


def test_restart_decision():
    assert not host.wants_restart({"DALLE_JAX_HUGE_PAGES": "0"})
    assert not host.wants_restart({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert host.wants_restart({}) == ((host.glibc_version() or (0,)) >= host.GLIBC_WITH_TUNABLE)
