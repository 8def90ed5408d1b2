"""Configs: command-line overrides, misspelled keys, and value checks."""
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from dalle_jax import config_lib, pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [f for f in sorted(os.listdir(os.path.join(ROOT, "configs"))) if f.endswith(".py")]


def parse(*overrides):
    """Parses flags exactly as train.py defines them, in a private FlagValues."""
    argv = ["train.py", f"--config={os.path.join(ROOT, 'configs', 'mini.py')}", *overrides]
    values = flags.FlagValues()
    # The override flags are found in `sys_argv` (sys.argv by default) when --config is defined.
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


def test_override_changes_only_the_named_values():
    default = parse()
    config = parse("--config.data.batch_size=64", "--config.mesh.shape=(2,4,1)",
                   "--config.data.augment.flip=True")
    assert (config.data.batch_size, tuple(config.mesh.shape), config.data.augment.flip) == (
        64, (2, 4, 1), True)
    config.data.batch_size, config.mesh.shape, config.data.augment.flip = (
        default.data.batch_size, default.mesh.shape, default.data.augment.flip)
    assert config.to_dict() == default.to_dict()


def test_misspelled_key_is_an_error_that_names_it():
    with pytest.raises(Exception, match="batch_sise"):
        parse("--config.data.batch_sise=64")


def test_misspelled_key_on_the_command_line_fails_before_any_work(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/mini.py", "--workdir", str(tmp_path),
         "--config.data.imagesize=64"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "imagesize" in result.stderr
    assert not os.listdir(tmp_path)  # Nothing half written.


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_and_validates(name):
    argv = ["x", f"--config={os.path.join(ROOT, 'configs', name)}"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    if pipeline.is_pipeline(values.config):
        assert set(pipeline.validate(values.config)) == set(values.config.stages)
    else:
        config_lib.validate(values.config)


def test_a_bad_value_in_a_later_pipeline_stage_fails_before_any_stage_runs(tmp_path):
    config = config_lib.load("pipeline_tiny")
    config.dalle.data.batch_size = 0
    with pytest.raises(ValueError, match=r"stage 'dalle' \(config.dalle\): "
                                         r"config.data.batch_size=0"):
        pipeline.run_pipeline(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")  # nothing trained, nothing written


@pytest.mark.parametrize("override, culprit", [
    (("data", "batch_size", 0), "config.data.batch_size=0"),
    (("data", "image_size", -32), "config.data.image_size=-32"),
    (("text", "length", 1), "config.text.length=1"),
    (("text", "bpe_dropout", 1.5), "config.text.bpe_dropout=1.5"),
    (("data", "workers", -1), "config.data.workers=-1"),
    (("train", "steps", 0), "config.train.steps=0"),
    (("train", "checkpoint_every", -1), "config.train.checkpoint_every=-1"),
    (("train", "keep_checkpoints", 0), "config.train.keep_checkpoints=0"),
])
def test_bad_values_get_a_one_line_error_naming_them(override, culprit):
    config = parse()
    section, key, value = override
    with config.unlocked():
        config[section][key] = value
    with pytest.raises(ValueError) as info:
        config_lib.validate(config)
    assert culprit in str(info.value) and "\n" not in str(info.value)


def test_bad_augmentation_is_named():
    config = parse("--config.data.augment.square=diagonal")
    with pytest.raises(ValueError, match="config.data.augment.square='diagonal'"):
        config_lib.validate(config)


def test_greyscale_views_need_a_probability_and_the_colour_words_to_drop():
    config = parse("--config.data.augment.greyscale=1.5")
    with pytest.raises(ValueError, match="config.data.augment.greyscale=1.5"):
        config_lib.validate(config)
    config = parse("--config.data.augment.greyscale=0.25")
    with pytest.raises(ValueError, match="needs config.data.augment.colour_words"):
        config_lib.validate(config)
    config = parse("--config.data.augment.greyscale=0.25",
                   "--config.data.augment.colour_words=('red', 'blue')")
    config_lib.validate(config)
    assert tuple(config.data.augment.colour_words) == ("red", "blue")
