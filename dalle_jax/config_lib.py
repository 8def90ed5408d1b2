"""The parts every config shares, and the checks that turn bad values into one-line errors.

Configs in `configs/` start from `base_config()` and change what their stage needs; the
entrypoints lock them, so an override of a key that does not exist fails and names the key.
"""
from __future__ import annotations

import importlib.util
import os

import ml_collections

from dalle_jax.data.augment import SQUARE_CROPS

# The sharding vocabulary: logical dimension names -> mesh axes. The batch is split over the
# data-parallel and the FSDP axes; weights are split over FSDP on their `embed` dimension
# and over the tensor axis on heads / MLP / vocabulary (Megatron-style).
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),  # the stacked (scanned) layer axis
    ("norm", None),  # layer-norm scales and biases: small, replicated
    ("act_embed", None),  # activations' model dimension (parameters' "embed" is FSDP-split)
    ("height", None),
    ("width", None),
    ("channels", None),
    # Convolution kernels (the dVAE): FSDP splits their output channels.
    ("conv_window", None),
    ("conv_in", None),
    ("conv_out", "fsdp"),
)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic_shapes"  # or "caption_folder", or a TFDS catalog name
    c.data.data_dir = ""  # "" = TFDS's default (~/tensorflow_datasets)
    c.data.folder = ""  # caption_folder: the folder of captioned images
    c.data.folder_max_side = 512  # caption_folder: shorter side stored at most this (0 = as is)
    c.data.shapes = ml_collections.ConfigDict(  # synthetic_shapes' builder config; 0 = default
        dict(image_size=32, num_train=0, num_validation=0, num_heldout=0, seed=0))
    c.data.image_key = "image"
    c.data.caption_key = "caption"  # nested features as "captions/text"
    c.data.train_split = "train"
    c.data.eval_split = "validation"
    c.data.image_size = 32  # side of the images the models see
    c.data.batch_size = 32  # global, over all hosts
    c.data.augment = ml_collections.ConfigDict(
        dict(square="center", min_scale=1.0, max_scale=1.125, flip=False,
             # The share of training views turned grey, their captions stripped of
             # `colour_words` (so still true): shape features that do not depend on colour.
             greyscale=0.0, colour_words=()))
    # Groups of interchangeable caption words (colours, shapes, ...): when set, every example
    # also gets `contrast_count` different captions made false by one edit each
    # (text/contrast.py), CLIP's hard negatives.
    c.data.contrast_words = ()
    c.data.contrast_count = 1
    c.data.contrast_excluded = ()  # phrases no hard negative may contain
    # synthetic_shapes: the first N examples of every global batch also bring the same view
    # with some named objects taken out (data/synthetic_shapes.py, `removals`), which CLIP
    # must score below the true one (0 = none).
    c.data.missing_object_negatives = 0
    c.data.workers = 0  # Grain worker processes per host (0 = in the main process)
    c.data.read_threads = 8
    c.data.prefetch = 2  # global batches assembled ahead of the step

    c.text = ml_collections.ConfigDict()
    c.text.length = 32  # tokens per caption, begin and end tokens included
    c.text.vocab_size = 128
    c.text.tokenizer = ""  # "" = <workdir>/tokenizer.model, trained on first use
    c.text.bpe_dropout = 0.0
    c.text.max_training_captions = 1_000_000

    c.mesh = ml_collections.ConfigDict(dict(
        axes=("data", "fsdp", "tensor"), shape=(-1, 1, 1),
        num_devices=0))  # use the first N devices only (0 = all), e.g. to compare with fewer
    c.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES))
    c.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=0, process_id=-1,
        cpu_collectives=""))  # "gloo" for multi-process runs on CPU devices

    c.profile_steps = 0  # train steps traced into <workdir>/profile (0 = none), from the 4th on
    c.report_batches = 20  # train.py, until the models exist: batches timed in the report

    # Which model family the loop trains ("dvae", later "dalle", "clip"); each task adds its
    # own `model` and `task` sections in its config files.
    c.task = ml_collections.ConfigDict(dict(name=""))
    c.model = ml_collections.ConfigDict()

    c.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=1e-4,
        schedule="cosine",  # "cosine", "linear" or "constant", after `warmup_steps`
        warmup_steps=0,
        end_learning_rate=0.0,  # where cosine / linear schedules end, at train.steps
        b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=1e-4,
        clip_norm=1.0,  # global gradient-norm clip; 0 = off
        ema_decay=0.999,  # EMA of the parameters; 0 = off
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        grad_accum=1,  # micro-batches per step (the batch is split, gradients averaged)
        compute_dtype="float32",  # "bfloat16" on accelerators: bf16 compute, fp32 parameters
        log_every=50,
        eval_every=500,
        eval_batches=0,  # 0 = the whole evaluation split
        images_every=500,
        checkpoint_every=500,  # 0 = only at the end of training and on preemption
        keep_checkpoints=3,
        max_nonfinite_in_row=10,  # skipped non-finite steps in a row before the run stops
    ))
    return c


def dalle_base_config() -> ml_collections.ConfigDict:
    """`base_config()` with the transformer's task and model sections at the paper's defaults.

    The configs (`dalle_mini`, `dalle_small`, `dalle_12b`) set the sizes.
    """
    c = base_config()
    c.data.augment.flip = False  # captions say "left of": a flip would make them false
    c.task = ml_collections.ConfigDict(dict(
        name="dalle",
        dvae_workdir="",  # a trained dVAE's workdir: its (EMA) encoder turns images into tokens
        text_loss_weight=1 / 8, image_loss_weight=7 / 8,
        caption_dropout=0.1,  # empty captions, for classifier-free guidance at sampling
        # Encode every training image once, before the first step, instead of in every step:
        # only where the views never change (no augmentation: see `validate`).
        token_cache=False,
    ))
    c.model = ml_collections.ConfigDict(dict(
        grid_size=32, image_vocab_size=8192,  # must match the dVAE
        d_model=512, num_heads=8, head_dim=64, mlp_dim=2048, depth=8,
        conv_kernel=11,  # the last layer's causal k×k neighbourhood
        attention="sparse",  # or "dense": the masked reference implementation
        layers="paper",  # row/column/conv as in the paper, or "causal" in every layer
        remat="none",  # "full" or "save_dots": recompute activations in the backward pass
        scan_unroll=1,  # layers per iteration of the loop over depth (depth: no loop)
        init_std=0.02,
    ))
    c.optimizer.update(dict(
        learning_rate=4.5e-4, schedule="constant", warmup_steps=5000, b1=0.9, b2=0.96,
        eps=1e-8, weight_decay=4.5e-2, clip_norm=4.0, ema_decay=0.99))
    return c


def clip_base_config() -> ml_collections.ConfigDict:
    """`base_config()` with CLIP's task and model sections (ViT-B/16 and CLIP's text tower).

    Optimiser as in the CLIP paper: AdamW β=(0.9, 0.98), ε 1e-6, weight decay 0.2, cosine
    decay after a warm-up. The configs (`clip_mini`, `clip`) set the sizes.
    """
    c = base_config()
    c.data.augment.flip = False  # captions say "left of": a flip would make them false
    # Zero-shot colour/shape accuracy on this many validation images at every evaluation
    # (synthetic_shapes only; 0 = off).
    c.task = ml_collections.ConfigDict(dict(name="clip", zero_shot_examples=1000))
    c.model = ml_collections.ConfigDict(dict(
        patch_size=16,
        image_width=768, image_depth=12, image_heads=12, image_mlp_ratio=4.0,
        image_pooling="mean",  # or "class": a learned class token's output
        image_position="learned",  # or "sincos2d": fixed 2-D sine-cosine features
        text_width=512, text_depth=12, text_heads=8, text_mlp_ratio=4.0,
        embed_dim=512,
        remat="none",  # "full" or "save_dots": recompute activations in the backward pass
        init_std=0.02,
    ))
    c.optimizer.update(dict(
        learning_rate=5e-4, schedule="cosine", warmup_steps=2000, end_learning_rate=0.0,
        b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.2, clip_norm=1.0, ema_decay=0.0))
    return c


def configs_dir() -> str:
    """Where the named configs are: the installed package's `dalle_jax.configs`, or, running
    from a checkout that is not installed, its top-level configs/."""
    spec = importlib.util.find_spec("dalle_jax.configs")
    if spec is not None and spec.submodule_search_locations:
        return list(spec.submodule_search_locations)[0]
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load(name_or_path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the named config (e.g. "dvae_mini": configs/dvae_mini.py) or of any
    config file's path."""
    path = name_or_path if name_or_path.endswith(".py") else os.path.join(
        configs_dir(), f"{name_or_path}.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_token_cache(config) -> None:
    """A cached view must be the view every epoch would see: the evaluation view (centred
    square at `image_size`), which the training augmentation gives only when it is off."""
    if not config.get("task", {}).get("token_cache", False):
        return
    aug = config.data.augment
    for key, value, fixed in (("square", aug.square, "center"), ("min_scale", aug.min_scale, 1.0),
                              ("max_scale", aug.max_scale, 1.0), ("flip", aug.flip, False),
                              ("greyscale", aug.get("greyscale", 0.0), 0.0)):
        _check(value == fixed, f"config.task.token_cache=True encodes each training image once, "
               f"but config.data.augment.{key}={value!r} changes its view between epochs "
               f"(set it to {fixed!r}, or the cache off)")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError naming the first bad value."""
    data, text, aug = config.data, config.text, config.data.augment
    _check(data.image_size > 0, f"config.data.image_size={data.image_size} must be positive")
    _check(data.batch_size > 0, f"config.data.batch_size={data.batch_size} must be positive")
    _check(aug.square in SQUARE_CROPS,
           f"config.data.augment.square={aug.square!r} must be one of {SQUARE_CROPS}")
    _check(0 < aug.min_scale <= aug.max_scale,
           f"config.data.augment min_scale={aug.min_scale} / max_scale={aug.max_scale} must "
           "satisfy 0 < min_scale <= max_scale")
    greyscale = aug.get("greyscale", 0.0)
    _check(0.0 <= greyscale <= 1.0,
           f"config.data.augment.greyscale={greyscale} must be a probability in [0, 1]")
    _check(not greyscale or len(aug.get("colour_words", ())) > 0,
           f"config.data.augment.greyscale={greyscale} needs config.data.augment.colour_words: "
           "the words a grey view's caption must lose to stay true")
    _check(data.workers >= 0, f"config.data.workers={data.workers} must be >= 0")
    for group in data.contrast_words:
        _check(not isinstance(group, str) and len(set(group)) >= 2,
               f"config.data.contrast_words group {group!r} must hold at least two words")
    _check(data.get("contrast_count", 1) >= 1,
           f"config.data.contrast_count={data.get('contrast_count', 1)} must be >= 1")
    negatives = data.get("missing_object_negatives", 0)
    _check(isinstance(negatives, int) and 0 <= negatives <= data.batch_size,
           f"config.data.missing_object_negatives={negatives!r} must be a number of examples "
           f"between 0 and config.data.batch_size={data.batch_size}")
    _check(not negatives or data.name == "synthetic_shapes",
           f"config.data.missing_object_negatives needs a data set with an `objects` feature "
           f"(synthetic_shapes), not config.data.name={data.name!r}")
    _check(data.read_threads > 0, f"config.data.read_threads={data.read_threads} must be positive")
    _check(text.length >= 2, f"config.text.length={text.length} cannot hold begin and end tokens")
    _check(text.vocab_size >= 8, f"config.text.vocab_size={text.vocab_size} must be at least 8")
    _check(0.0 <= text.bpe_dropout < 1.0,
           f"config.text.bpe_dropout={text.bpe_dropout} must be in [0, 1)")
    _check(len(config.mesh.axes) == len(config.mesh.shape),
           f"config.mesh.shape {tuple(config.mesh.shape)} and config.mesh.axes "
           f"{tuple(config.mesh.axes)} differ in length")
    _check_token_cache(config)
    _check(config.profile_steps >= 0, f"config.profile_steps={config.profile_steps} must be >= 0")
    train = config.train
    _check(train.steps > 0, f"config.train.steps={train.steps} must be positive")
    for key in ("log_every", "eval_every", "images_every", "checkpoint_every"):
        _check(train[key] >= 0, f"config.train.{key}={train[key]} must be >= 0 (0 = off)")
    _check(train.keep_checkpoints > 0,
           f"config.train.keep_checkpoints={train.keep_checkpoints} must be positive")
