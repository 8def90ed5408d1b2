"""Every command has one face: absl flags (`--help` lists them), and a workdir that is not one
ends it with a single line naming the command and the path."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (how it is started, a flag its --help must list, the arguments beside --workdir it needs)
COMMANDS = [
    (["sample.py"], "--rerank", ["--prompt=a red circle"]),
    (["-m", "dalle_jax.serve"], "--max_queue", []),
    (["-m", "dalle_jax.evaluate"], "--candidates", []),
    (["-m", "dalle_jax.evaluation.reconstruction"], "--limit", []),
    (["-m", "dalle_jax.evaluation.retrieval"], "--batch", []),
]


def run(args, cwd=ROOT):
    """The command from `cwd`; a script is named by its path in the checkout."""
    if args[0].endswith(".py"):
        args = [os.path.join(ROOT, args[0]), *args[1:]]
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("command, flag", [(c, f) for c, f, _ in COMMANDS] + [
    (["train.py"], "--workdir"), (["-m", "dalle_jax.plan"], "--devices"),
    (["-m", "dalle_jax.convert.openai_dvae"], "--encoder")])
def test_help_lists_the_commands_flags(command, flag):
    result = run([*command, "--help"])
    assert f"{flag}:" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("command, _, extra", COMMANDS)
def test_a_missing_workdir_is_a_one_line_error(command, _, extra, tmp_path):
    missing = tmp_path / "nothing"
    result = run([*command, f"--workdir={missing}", *extra], cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    name = command[-1] if command[0] == "-m" else command[0]
    assert last.startswith(f"{name}: ") and str(missing) in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
