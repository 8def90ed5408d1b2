"""A workdir read back: portable paths, parameters-only loading, the pipeline layout, errors."""
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from dalle_jax import config_lib
from dalle_jax import workdir as workdir_lib
from dalle_jax.models import dalle, dvae
from dalle_jax.pipeline import make_task
from dalle_jax.sampling.generator import Generator, Settings
from dalle_jax.sharding import mesh as mesh_lib
from dalle_jax.training import loop


def config_with_paths(**paths) -> ml_collections.ConfigDict:
    config = config_lib.dalle_base_config()
    for dotted, value in paths.items():
        section, key = dotted.split("__")
        config[section][key] = value
    return config


def test_paths_inside_the_workdir_are_relative_and_outside_absolute(tmp_path, monkeypatch):
    """Written from one directory with paths given relative to it, read from another."""
    monkeypatch.chdir(tmp_path)
    os.makedirs("jobs/mini/dalle")
    config = config_with_paths(text__tokenizer="jobs/mini/tokenizer.model",
                               task__dvae_workdir="jobs/mini/dvae", data__data_dir="data",
                               data__folder="gs://bucket/images")
    workdir_lib.write_config(config, "jobs/mini/dalle", root="jobs/mini")
    with open("jobs/mini/dalle/config.json") as f:
        raw = json.load(f)
    assert raw["text"]["tokenizer"] == os.path.join("..", "tokenizer.model")
    assert raw["task"]["dvae_workdir"] == os.path.join("..", "dvae")
    assert raw["data"]["data_dir"] == str(tmp_path / "data")  # outside: absolute
    assert raw["data"]["folder"] == "gs://bucket/images"  # a URL as it is

    shutil.move(tmp_path / "jobs", tmp_path / "moved")  # the whole workdir moves
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    read = workdir_lib.read_config(str(tmp_path / "moved" / "mini" / "dalle"))
    assert read.text.tokenizer == str(tmp_path / "moved" / "mini" / "tokenizer.model")
    assert read.task.dvae_workdir == str(tmp_path / "moved" / "mini" / "dvae")
    assert read.data.data_dir == str(tmp_path / "data")

    # A run of its own (no pipeline): its dVAE elsewhere is recorded absolute, empty is empty.
    config = config_with_paths(task__dvae_workdir="../dvae_mini", text__tokenizer="")
    os.makedirs("dalle_mini")
    workdir_lib.write_config(config, "dalle_mini")
    raw = json.loads((elsewhere / "dalle_mini" / "config.json").read_text())
    assert raw["task"]["dvae_workdir"] == str(tmp_path / "dvae_mini")
    assert raw["text"]["tokenizer"] == ""


def test_a_trained_pipeline_records_its_stages_relative_to_themselves(pipeline_run):
    with open(os.path.join(pipeline_run, "dalle", "config.json")) as f:
        raw = json.load(f)
    assert raw["task"]["dvae_workdir"] == os.path.join("..", "dvae")
    assert raw["text"]["tokenizer"] == os.path.join("..", "tokenizer.model")


def test_a_copied_pipeline_workdir_loads_from_another_directory(pipeline_run, tmp_path,
                                                                 monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(pipeline_run, copy)
    moved = tmp_path / "moved"
    os.rename(copy, moved)
    monkeypatch.chdir(tmp_path)
    run = workdir_lib.Run("moved/dalle", expect="dalle")
    assert run.config.task.dvae_workdir == str(moved / "dvae")
    assert run.tokenizer_path == str(moved / "tokenizer.model")
    assert workdir_lib.transformer_and_rerankers("moved") == (
        str(moved / "dalle"), [str(moved / "clip"), str(moved / "grey_clip")])
    here = Generator.from_workdir("moved", batch_size=4)("a red circle", n=2, seed=3)
    there = Generator.from_workdir(pipeline_run, batch_size=4)("a red circle", n=2, seed=3)
    np.testing.assert_array_equal(here, there)


def full_train_state(run_dir: str):
    """The run's whole latest train state, restored as resuming training does."""
    config = workdir_lib.read_config(run_dir)
    config.mesh.update(dict(shape=(1, 1, 1), num_devices=1))
    plan = loop.plan_step(config, make_task(config), mesh_lib.build_mesh(config.mesh))
    path = os.path.join(workdir_lib.checkpoint_dir(run_dir), str(workdir_lib.latest_step(run_dir)),
                        workdir_lib.STATE)
    return ocp.StandardCheckpointer().restore(path, plan.abstract_state)


@pytest.mark.parametrize("use_ema", [True, False])
def test_loading_gives_the_ema_or_raw_parameters_of_the_train_state(dalle_run, use_ema):
    state = full_train_state(dalle_run)
    expected = state.ema if use_ema else state.params
    model = workdir_lib.Run(dalle_run).load_model(dalle.from_config, use_ema=use_ema)
    loaded = nnx.state(model, nnx.Param)
    assert jax.tree.structure(loaded) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # EMA and raw parameters differ after training: the test tells them apart.
    assert not np.array_equal(np.asarray(jax.tree.leaves(state.ema)[0]),
                              np.asarray(jax.tree.leaves(state.params)[0]))


def test_loading_onto_a_mesh_shards_each_parameter_by_its_logical_axes(dalle_run):
    run = workdir_lib.Run(dalle_run)
    mesh = mesh_lib.build_mesh(ml_collections.ConfigDict(dict(
        run.config.mesh.to_dict(), shape=(1, 2, 4), num_devices=0)))
    sharded = run.load_model(dalle.from_config, mesh=mesh)
    single = run.load_model(dalle.from_config)
    specs = set()
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(nnx.state(single)),
                    strict=True):
        assert a.sharding.mesh == mesh
        specs.add(str(a.sharding.spec))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any("tensor" in spec for spec in specs) and any("fsdp" in spec for spec in specs)


def test_loading_skips_an_unreadable_newest_step_and_says_which_it_used(dalle_run, tmp_path,
                                                                         caplog):
    import logging

    copy = str(tmp_path / "dalle")
    shutil.copytree(dalle_run, copy)
    steps = sorted(ocp.utils.checkpoint_steps(workdir_lib.checkpoint_dir(copy)))
    assert len(steps) >= 2, steps
    newest = os.path.join(workdir_lib.checkpoint_dir(copy), str(steps[-1]), workdir_lib.STATE)
    for directory, _, names in os.walk(newest):  # every file cut in half
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    run = workdir_lib.Run(copy)
    with caplog.at_level(logging.WARNING):
        model = run.load_model(dalle.from_config)
    warnings = [r.getMessage() for r in caplog.records]
    assert any(f"checkpoint step {steps[-1]} of {copy} does not read back" in m
               for m in warnings), warnings
    assert run.loaded_step == steps[-2]
    older = workdir_lib.Run(dalle_run).load_model(dalle.from_config, step=steps[-2])
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(older)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match=f"checkpoint step {steps[-1]} of .* does not "
                                                "read back"):
        run.load_model(dalle.from_config, step=steps[-1])  # asked for by number: no fallback


def test_a_dvae_loads_in_the_dtype_asked_for(dvae_run):
    model = workdir_lib.Run(dvae_run).load_model(dvae.from_config, dtype="bfloat16")
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
    float32 = workdir_lib.Run(dvae_run).load_model(dvae.from_config)
    # Parameters stay float32; the convolutions compute in bfloat16, the logits in float32.
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))} == {np.dtype("float32")}
    low, high = model.encoder_logits(images), float32.encoder_logits(images)
    assert low.dtype == high.dtype == np.float32
    assert 0 < float(np.max(np.abs(low - high))) < 0.1 * float(np.max(np.abs(high)))


def test_bad_workdirs_are_one_line_errors(pipeline_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a training workdir"):
        workdir_lib.Run(str(tmp_path))
    with pytest.raises(ValueError, match="holds a dVAE run, not a transformer"):
        workdir_lib.Run(os.path.join(pipeline_run, "dvae"), expect="dalle")
    with pytest.raises(FileNotFoundError, match="neither a pipeline workdir"):
        workdir_lib.transformer_and_rerankers(str(tmp_path))
    empty = tmp_path / "untrained"
    empty.mkdir()
    shutil.copy(os.path.join(pipeline_run, "dvae", "config.json"), empty)
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*train this stage first"):
        workdir_lib.Run(str(empty)).load_model(dvae.from_config)
    assert workdir_lib.is_pipeline(pipeline_run)
    assert not workdir_lib.is_pipeline(os.path.join(pipeline_run, "dalle"))


def test_a_generator_restored_onto_a_tensor_parallel_mesh_draws_the_same_images(dalle_run):
    """Restored straight into the sampling mesh's shardings (heads over 4 devices, images over
    2), the transformer draws the tokens of the one-device run."""
    prompts = ["a red circle", "a blue square above a green circle"]
    alone = Generator.from_workdir(dalle_run, batch_size=4)
    sharded = Generator.from_workdir(dalle_run, batch_size=4, mesh_shape=(2, 1, 4))
    query = sharded._state["stack"]["blocks"]["attention"]["query"][...]
    assert "tensor" in str(query.sharding.spec) and query.sharding.mesh.size == 8
    assert len(query.addressable_shards) == 8  # each device holds its own part
    for seed in (0, 1):
        np.testing.assert_array_equal(sharded.tokens(prompts, 2, seed),
                                      alone.tokens(prompts, 2, seed))


def test_a_generator_in_bf16_casts_parameters_on_load_and_caches_in_bf16(dalle_run):
    generate = Generator.from_workdir(dalle_run, batch_size=4, dtype="bfloat16")
    params = nnx.state(generate.model, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("bfloat16")}
    assert {c.dtype for c in jax.tree.leaves(generate.model.init_cache(1))} == {
        np.dtype("bfloat16")}
    reference = Generator.from_workdir(dalle_run, batch_size=4)
    for ours, theirs in zip(jax.tree.leaves(params),
                            jax.tree.leaves(nnx.state(reference.model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(ours),
                                      np.asarray(theirs.astype(np.dtype("bfloat16"))))
    prompts = ["a red circle", "a blue square above a green circle"]
    ours = generate.tokens(prompts, 2, settings=Settings(temperature=0.0))
    theirs = reference.tokens(prompts, 2, settings=Settings(temperature=0.0))
    # Greedy tokens agree until a near tie (test_sampling.py shows why); most of them here.
    assert np.mean(ours == theirs) > 0.5
