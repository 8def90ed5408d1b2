"""Faults a long run meets: SIGKILL at any moment, a checkpoint that does not read back, a
workdir that cannot be written. Nothing trained may be lost, and each fault is named in one line.

The reference is always an uninterrupted run of the same config: the toy task's run is
deterministic, so a resumed run must end with the same parameters, EMA and optimizer state,
bit for bit.
"""
import logging
import os
import random
import subprocess
import sys
import time

import pytest

from dalle_jax import files
from dalle_jax import workdir as workdir_lib
from dalle_jax.training import loop
from test_training import assert_trees_close, run_toy_subprocess
from toy_task import ToyTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkpoint_names(workdir) -> list[str]:
    directory = workdir_lib.checkpoint_dir(str(workdir))
    return os.listdir(directory) if os.path.isdir(directory) else []


def saving(workdir) -> bool:
    """An asynchronous save is in flight: Orbax writes a step under a temporary name first."""
    return any("orbax-checkpoint-tmp" in name for name in checkpoint_names(workdir))


def kill_repeatedly(config, workdir, kills: int, seed: int) -> tuple[int, int]:
    """Starts the run again and again, each time SIGKILLing it at a random moment after it
    made progress, every other time as soon as a save is in flight. Returns (kills, kills
    that interrupted a save)."""
    rng = random.Random(seed)
    done = during_save = 0
    while done < kills:
        before = workdir_lib.latest_step(str(workdir)) or 0
        proc = run_toy_subprocess(config, str(workdir))
        deadline = time.time() + 240
        while (workdir_lib.latest_step(str(workdir)) or 0) <= before:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() < deadline, "the run made no progress"
            time.sleep(0.01)
        if done % 2 == 0:
            while not saving(workdir) and proc.poll() is None:
                time.sleep(0.001)
        else:
            time.sleep(rng.uniform(0.0, 0.3))
        proc.kill()
        proc.wait()
        assert proc.returncode == -9, "the run ended before it was killed"
        during_save += saving(workdir)
        done += 1
    return done, during_save


def assert_same_final_state(resumed, straight):
    assert int(resumed.step) == int(straight.step)
    for part in ("params", "ema", "opt_state", "rest"):
        assert_trees_close(getattr(resumed, part), getattr(straight, part), rtol=0, atol=0)


@pytest.fixture
def long_toy_config(toy_config):
    toy_config.train.update(dict(steps=40, checkpoint_every=2, keep_checkpoints=2,
                                 log_every=50, eval_every=0, images_every=0))
    return toy_config


@pytest.mark.parametrize("kills", [pytest.param(2, id="2-kills"),
                                   pytest.param(10, id="10-kills", marks=pytest.mark.slow)])
def test_sigkills_at_random_moments_lose_nothing(long_toy_config, tmp_path, kills, capsys):
    config = long_toy_config
    workdir = tmp_path / "killed"
    count, during_save = kill_repeatedly(config, workdir, kills, seed=kills)
    with capsys.disabled():
        print(f"\n{count} SIGKILLs, {during_save} of them during an asynchronous save")
    assert during_save >= 1
    resumed = loop.train(config, str(workdir), task=ToyTask())
    straight = loop.train(config, str(tmp_path / "straight"), task=ToyTask())
    assert_same_final_state(resumed, straight)


@pytest.fixture
def extendable_toy_config(toy_config):
    """8 steps, a checkpoint every 4, at a constant rate after the warm-up: a run stopped at
    step 8 and continued to 12 follows the schedule of one that goes to 12 at once."""
    toy_config.optimizer.schedule = "constant"
    return toy_config


def damage(step_dir: str, how: str) -> str:
    """Damages the largest file of a step's train state; returns its path."""
    state = os.path.join(step_dir, workdir_lib.STATE)
    found = [os.path.join(d, n) for d, _, names in os.walk(state) for n in names]
    largest = max(found, key=os.path.getsize)
    if how == "truncated":
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    else:
        os.remove(largest)
    return largest


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_an_unreadable_latest_step_is_moved_aside_and_the_one_before_resumes(
        extendable_toy_config, tmp_path, caplog, how):
    config = extendable_toy_config
    workdir = str(tmp_path / "run")
    loop.train(config, workdir, task=ToyTask())
    damage(os.path.join(workdir_lib.checkpoint_dir(workdir), "8"), how)
    config.train.steps = 12
    with caplog.at_level(logging.WARNING):
        resumed = loop.train(config, workdir, task=ToyTask())
    warnings = [r.getMessage() for r in caplog.records if "does not read back" in r.getMessage()]
    assert len(warnings) == 1 and "checkpoint step 8 of" in warnings[0], warnings
    assert any(name.startswith("8.unreadable-") for name in checkpoint_names(workdir))
    straight = loop.train(config, str(tmp_path / "straight"), task=ToyTask())
    assert_same_final_state(resumed, straight)


def test_a_save_cut_short_is_ignored_with_a_warning(extendable_toy_config, tmp_path, caplog):
    config = extendable_toy_config
    workdir = str(tmp_path / "run")
    loop.train(config, workdir, task=ToyTask())
    leftover = os.path.join(workdir_lib.checkpoint_dir(workdir), "12.orbax-checkpoint-tmp-7")
    os.makedirs(os.path.join(leftover, workdir_lib.STATE))
    config.train.steps = 12
    with caplog.at_level(logging.WARNING):
        resumed = loop.train(config, workdir, task=ToyTask())
    assert any("interrupted before it finished" in r.getMessage() and "12.orbax" in
               r.getMessage() for r in caplog.records)
    straight = loop.train(config, str(tmp_path / "straight"), task=ToyTask())
    assert_same_final_state(resumed, straight)


def test_an_unwritable_workdir_fails_at_start_in_one_line(tmp_path):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/dvae_mini.py",
         "--workdir", str(in_the_way / "run")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: workdir ") and "is not writable" in last, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_disk_without_room_for_a_checkpoint_fails_before_the_first_step(
        toy_config, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_bytes", lambda directory: 1000)
    workdir = str(tmp_path / "run")
    with pytest.raises(files.NotWritable, match=r"MiB free; one checkpoint of this train state "
                                                r"takes"):
        loop.train(toy_config, workdir, task=ToyTask())
    assert checkpoint_names(workdir) == [] and not os.path.exists(
        os.path.join(workdir, "metrics.jsonl"))
