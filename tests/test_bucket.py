"""Workdirs in a bucket: every file goes through `etils.epath`, so gs:// needs no mount.

`test_the_pipeline_trains_resumes_and_samples_in_a_bucket` runs the tiny pipeline with
`gs://bucket/run` as its workdir against `fake_gcs` (an in-memory object store behind epath's
fsspec backend, TensorStore's GCS driver and google-cloud-storage; see tests/fake_gcs.py).

What it proves: every file the project writes or reads in a workdir (configs, the tokenizer,
metrics.jsonl, TensorBoard's events, image grids, Orbax's checkpoints with their arrays, the
data iterators' files, samples) reaches the bucket through APIs a bucket supports (no append,
no rename of a directory, no local path standing in for a URL: the run's current directory
stays empty); a second run resumes from the bucket's checkpoints and keeps the earlier metrics;
a model loaded from the bucket draws the same images as from a local copy of its objects.
What only a real bucket can prove: authentication, TensorFlow's GCS client (epath's default
backend for gs:// when TensorFlow is installed; the fake goes through fsspec), latency and
throughput, listing consistency and quotas. The TFDS data set stays local here: TFDS reads a
gs:// `data_dir` through TensorFlow's own file systems, which the fake does not reach.
"""
import ast
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_pipeline_config
from fake_gcs import fake_gcs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET_RUN = "gs://bucket/run"


def shortened(config):
    """The tiny pipeline with fewer steps and one CLIP: the files matter here, not the models."""
    config.stages = ("dvae", "clip", "dalle")
    steps = {"dvae": 20, "clip": 10, "dalle": 10}
    for stage, count in steps.items():
        train = config[stage].train
        train.update(dict(steps=count, log_every=5, eval_every=count, images_every=count,
                          checkpoint_every=count))
    config.dvae.task.update(dict(kl_warmup_steps=5, temperature_steps=10))
    for stage in ("clip", "dalle"):
        config[stage].optimizer.warmup_steps = 2
    return config


def objects_below(store, prefix: str) -> dict[str, bytes]:
    return {name[len(prefix):]: data for name, (data, _) in store.objects.items()
            if name.startswith(prefix)}


def test_the_pipeline_trains_resumes_and_samples_in_a_bucket(mini_config, tmp_path,
                                                             monkeypatch):
    from dalle_jax import pipeline
    from dalle_jax import workdir as workdir_lib
    from dalle_jax.sampling.generator import Generator
    from dalle_jax.training.metrics import read_metrics

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # a path that mistook the URL for a local one would land here
    config = shortened(tiny_pipeline_config(mini_config))
    with fake_gcs() as store:
        samples = pipeline.run_pipeline(config, BUCKET_RUN)
        assert samples == f"{BUCKET_RUN}/samples"
        run = objects_below(store, "bucket/run/")
        for stage in config.stages:
            steps = config[stage].train.steps
            assert f"{stage}/config.json" in run
            assert f"{stage}/checkpoints/{steps}/commit_success.txt" in run
            assert f"{stage}/checkpoints/{steps}/data/process_0-of-1.json" in run
            assert any(name.startswith(f"{stage}/checkpoints/{steps}/state/") and "/d/" in name
                       for name in run), "no array data written by TensorStore"
            assert any(name.startswith(f"{stage}/tensorboard/events.out.tfevents")
                       for name in run)
            logged = [r["step"] for r in read_metrics(f"{BUCKET_RUN}/{stage}") if "train/loss" in r]
            assert logged == list(range(5, steps + 1, 5)), stage
        assert "tokenizer.model" in run
        dalle_config = json.loads(run["dalle/config.json"])
        assert dalle_config["task"]["dvae_workdir"] == "../dvae"  # portable inside the bucket
        assert workdir_lib.read_config(f"{BUCKET_RUN}/dalle").task.dvae_workdir == \
            f"{BUCKET_RUN}/dvae"
        grids = [name for name in run if name.startswith("samples/grid_")]
        assert len(grids) == len(config.samples.prompts)
        assert Image.open(io.BytesIO(run[grids[0]])).size[0] > 0
        assert any(name.startswith("dalle/images/") for name in run)
        assert json.loads(run["samples/samples.json"])["prompts"] == list(config.samples.prompts)

        # A second run with more transformer steps resumes from the bucket's checkpoint, and
        # metrics.jsonl (rewritten whole: objects cannot be appended to) keeps the first run's.
        config.dalle.train.update(dict(steps=15, checkpoint_every=15, eval_every=15))
        pipeline.run_pipeline(config, BUCKET_RUN)
        logged = [r["step"] for r in read_metrics(f"{BUCKET_RUN}/dalle") if "train/loss" in r]
        assert logged == [5, 10, 15]
        assert workdir_lib.latest_step(f"{BUCKET_RUN}/dalle") == 15

        from_bucket = Generator.from_workdir(BUCKET_RUN, batch_size=4, clip_workdir=[])
        drawn_from_bucket = from_bucket(["a red circle"], 2, seed=3)
        run = objects_below(store, "bucket/run/")

    assert os.listdir(cwd) == []
    local = tmp_path / "copy"
    for name, data in run.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    from_local = Generator.from_workdir(str(local), batch_size=4, clip_workdir=[])
    np.testing.assert_array_equal(drawn_from_bucket, from_local(["a red circle"], 2, seed=3))


def test_an_unreadable_step_in_a_bucket_is_moved_aside_and_the_one_before_resumes(
        toy_config, tmp_path, caplog):
    """Moving a step aside renames a directory, which an object store does object by object."""
    import logging

    from dalle_jax import workdir as workdir_lib
    from dalle_jax.training import loop
    from test_faults import assert_same_final_state
    from toy_task import ToyTask

    toy_config.optimizer.schedule = "constant"  # stopping at 8 and going on to 12 = 12 at once
    run = f"{BUCKET_RUN}/toy"
    with fake_gcs() as store:
        loop.train(toy_config, run, task=ToyTask())
        state_objects = sorted(n for n in store.objects
                               if n.startswith("bucket/run/toy/checkpoints/8/state/"))
        largest = max(state_objects, key=lambda n: len(store.objects[n][0]))
        cut = store.objects[largest][0][:len(store.objects[largest][0]) // 2]
        store.put(largest, cut)
        toy_config.train.steps = 12
        with caplog.at_level(logging.WARNING):
            resumed = loop.train(toy_config, run, task=ToyTask())
        moved = {n.split("/")[4]: n for n in store.objects
                 if n.startswith("bucket/run/toy/checkpoints/8.unreadable-")}
        moved_step = largest.replace("/8/", f"/{next(iter(moved))}/")
        assert store.objects[moved_step][0] == cut  # the damaged step, object by object
        assert workdir_lib.latest_step(run) == 12
    assert any("checkpoint step 8 of gs://bucket/run/toy/checkpoints does not read back" in
               r.getMessage() for r in caplog.records)
    assert len(moved) == 1
    straight = loop.train(toy_config, str(tmp_path / "straight"), task=ToyTask())
    assert_same_final_state(resumed, straight)


# --- the code itself ------------------------------------------------------------------------

# Calls that touch the local file system (or treat a URL as a local path) when given a path.
LOCAL_ONLY = {"open", "os.makedirs", "os.mkdir", "os.replace", "os.rename", "os.remove",
              "os.unlink", "os.listdir", "os.scandir", "os.walk", "os.rmdir", "shutil.*",
              "os.path.*", "pathlib.*", "tempfile.*"}
# The one module that may (its helpers decide local or remote), and string-only exceptions.
ALLOWED = {
    "dalle_jax/files.py": {"*"},
    "dalle_jax/cli.py": {"os.path.*"},  # the package's own source files, for log filtering
    "dalle_jax/config_lib.py": {"os.path.*"},  # config .py files: Python imports them locally
    "dalle_jax/data/caption_folder.py": {"os.path.expanduser"},  # a local folder's "~" only
}


def dotted_name(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted_name(node.value)}.{node.attr}"
    return ""


def matches(name: str, patterns) -> bool:
    return any(name == p or (p.endswith(".*") and name.startswith(p[:-1])) or p == "*"
               for p in patterns)


def local_file_calls(path: str, relative: str) -> list[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    found = []
    for node in ast.walk(tree):
        name = ""
        if isinstance(node, ast.Call):
            name = dotted_name(node.func)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            module = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            name = f"{module}.*" if module in ("pathlib", "shutil", "tempfile") else ""
        if name and matches(name, LOCAL_ONLY) and not matches(name, ALLOWED.get(relative, ())):
            found.append(f"{relative}:{node.lineno} {name}")
    return found


def test_no_local_file_calls_outside_the_files_module():
    """Workdir paths may be URLs: only `dalle_jax.files` (epath) touches files, so no
    `open()`, `os.path` or `shutil` call can take a gs:// path for a local one."""
    sources = [os.path.join(ROOT, "train.py"), os.path.join(ROOT, "sample.py")]
    for directory, _, names in os.walk(os.path.join(ROOT, "dalle_jax")):
        sources += [os.path.join(directory, n) for n in names if n.endswith(".py")]
    found = [call for path in sorted(sources)
             for call in local_file_calls(path, os.path.relpath(path, ROOT))]
    assert found == []


@pytest.mark.parametrize("snippet,expected", [
    ("open(p)", ["x.py:1 open"]),
    ("import os\nos.path.join(a, b)", ["x.py:2 os.path.join"]),
    ("from pathlib import Path", ["x.py:1 pathlib.*"]),
    ("files.write_text(p, t)", []),
])
def test_the_check_finds_local_file_calls(tmp_path, snippet, expected):
    path = tmp_path / "x.py"
    path.write_text(snippet)
    assert local_file_calls(str(path), "x.py") == expected
