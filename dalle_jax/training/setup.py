"""What a training run does before its first step: config checks, the other hosts, the mesh,
the data set, the tokenizer and the workdir's config record (and the input report of a config
without a model)."""
from __future__ import annotations

import json
from typing import Callable, TypeVar

import jax
from absl import logging
from jax.experimental import multihost_utils

from dalle_jax import config_lib, files
from dalle_jax import workdir as workdir_lib
from dalle_jax.data import input_pipeline, sources
from dalle_jax.sharding import logical, mesh as mesh_lib
from dalle_jax.text import tokenizer as tokenizer_lib

T = TypeVar("T")


def first_process_then_all(name: str, make: Callable[[], T], load: Callable[[], T]) -> T:
    """Process 0 makes a shared artefact (a data set, a tokenizer); the others wait, then load it.

    Several hosts building into one bucket at once would race on the same files.
    """
    if jax.process_count() == 1:
        return make()
    if jax.process_index() == 0:
        make()
    multihost_utils.sync_global_devices(name)
    return load()


def load_or_train_tokenizer(config, workdir: str) -> tokenizer_lib.Tokenizer:
    """The run's tokenizer; trained on the training split's captions when the workdir has none."""
    path = workdir_lib.tokenizer_path(config, workdir)

    def make():
        if files.exists(path) or config.text.tokenizer:
            return tokenizer_lib.Tokenizer(path)  # An explicit path must exist: no silent retrain.
        logging.info("training a %d-piece tokenizer on %s captions -> %s",
                     config.text.vocab_size, config.data.train_split, path)
        captions = sources.captions(config.data, config.data.train_split,
                                    limit=config.text.max_training_captions)
        return tokenizer_lib.train_tokenizer(captions, config.text.vocab_size, path)

    tokenizer = first_process_then_all("tokenizer", make, lambda: tokenizer_lib.Tokenizer(path))
    if tokenizer.vocab_size > config.text.vocab_size:
        # Its ids would index past the text embedding of a model sized by the config.
        raise ValueError(f"tokenizer {path} has {tokenizer.vocab_size} pieces, more than "
                         f"config.text.vocab_size={config.text.vocab_size}")
    return tokenizer


def prepare_data(data_config):
    """The data set's TFDS builder, built first by process 0 if it is not yet."""
    return first_process_then_all("data", lambda: sources.prepared_builder(data_config),
                                  lambda: sources.prepared_builder(data_config))


def setup(config, workdir: str, root: str | None = None):
    """Validates the config, joins the other hosts, builds mesh, data set and tokenizer, and
    records the config in `workdir` (`root`: the pipeline workdir it is a stage of, if any)."""
    config_lib.validate(config)
    mesh_lib.initialize_distributed(config)
    mesh = mesh_lib.build_mesh(config.mesh)
    logical.validate_rules(config.sharding.rules, mesh.axis_names)
    ways = logical.batch_axis_size(mesh, config.sharding.rules)
    if config.data.batch_size % ways:
        raise ValueError(f"config.data.batch_size={config.data.batch_size} does not divide "
                         f"over the {ways} batch shards of mesh {dict(mesh.shape)}")
    files.check_writable(workdir)
    workdir_lib.write_config(config, workdir, root)
    prepare_data(config.data)
    tokenizer = load_or_train_tokenizer(config, workdir)
    return mesh, tokenizer


def input_report(config, workdir: str) -> dict:
    """A batch's shapes and sharding and the pipeline's throughput for `config`."""
    mesh, tokenizer = setup(config, workdir)
    batches = input_pipeline.global_batches(config, config.data.train_split, mesh, tokenizer,
                                      training=True)
    try:
        first = next(batches)
        throughput = input_pipeline.measure_throughput(batches, config.report_batches)
    finally:
        batches.close()
    report = {
        "mesh": dict(mesh.shape),
        "processes": jax.process_count(),
        "tokenizer": {"path": tokenizer.path, "vocab_size": tokenizer.vocab_size},
        "batch": {k: {"shape": list(v.shape), "dtype": str(v.dtype),
                      "sharding": str(v.sharding.spec)} for k, v in first.items()},
        "first_caption": tokenizer.decode(jax.device_get(
            first["text"].addressable_shards[0].data[0])),
        "throughput": throughput,
    }
    if jax.process_index() == 0:
        files.write_text(files.join(workdir, "input_report.json"), json.dumps(report, indent=2))
    return report
