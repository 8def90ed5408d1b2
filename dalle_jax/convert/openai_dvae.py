"""OpenAI's released DALL·E dVAE (encoder.pkl, decoder.pkl) -> a workdir of this project's dVAE.

    python -m dalle_jax.convert.openai_dvae --encoder encoder.pkl --decoder decoder.pkl \
        --out workdirs/openai_dvae

The files are whole `dall_e.Encoder` / `dall_e.Decoder` modules saved with torch.save, so
reading them means unpickling. Unpickling runs code from the file: convert only files you
trust, such as the ones you downloaded from OpenAI yourself. PyTorch and OpenAI's `dall_e` package are needed here only, nowhere else in the
package (pip install -e ".[convert]" && pip install --no-deps dall-e==0.1: its own
requirements would replace a CPU PyTorch with a CUDA one, for a torchvision it never imports).

The output is what a training run leaves: config.json (configs/dvae.py with the released
model's sizes) and an Orbax checkpoint of the train state at step 0 whose EMA equals the
weights, so `ImageCodec.from_workdir(out)` and `--config.task.dvae_workdir=out` work as for a
trained dVAE. The model computes in float32, as the release does on a CPU.

Our model mirrors the release layer for layer, so a weight maps by its path alone; torch's
(out, in, kh, kw) kernels become (kh, kw, in, out). Both compute a cross-correlation with
symmetric 'same' padding, so no kernel is flipped.
"""
from __future__ import annotations

import hashlib
import io
import secrets

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import nnx

from dalle_jax import cli, config_lib, files
from dalle_jax import workdir as workdir_lib
from dalle_jax.models import dvae
from dalle_jax.training import checkpoint, optimizer
from dalle_jax.training import state as state_lib

INSTALL_HINT = 'pip install -e ".[convert]" && pip install --no-deps dall-e==0.1'
TRUST_WARNING = ("Unpickling runs code from the file: convert only encoder.pkl / decoder.pkl "
                 "files you trust, such as the ones you downloaded from OpenAI yourself.")
SHARED_SIZES = ("group_count", "n_hid", "n_blk_per_group", "vocab_size")
RELEASE_LEAF_NAMES = {"kernel": "w", "bias": "b"}  # dall_e's Conv2d calls them w and b


# --- reading the release --------------------------------------------------------------------

def import_dall_e():
    """(torch, dall_e), or a SystemExit saying how to install them."""
    try:
        import torch
        import dall_e
    except ImportError as e:
        raise SystemExit(f"converting needs PyTorch and OpenAI's dall_e package ({e}); "
                         f"install them with: {INSTALL_HINT}") from None
    return torch, dall_e


def load_release_module(path: str, flag: str, expected: type):
    """The unpickled module in `path`, which must be an instance of `expected`."""
    torch, _ = import_dall_e()
    if not files.is_file(path):
        raise SystemExit(f"{flag} {path!r}: no such file")
    try:
        module = torch.load(io.BytesIO(files.read_bytes(path)), weights_only=False,
                            map_location="cpu")
    except Exception as e:  # Anything can fail inside an unpickler; say which file it was.
        raise SystemExit(f"{flag} {path!r} is not a loadable PyTorch pickle "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(module, expected):
        found = f"{type(module).__module__}.{type(module).__qualname__}"
        raise SystemExit(f"{flag} {path!r} holds a {found}, not a dall_e.{expected.__name__}")
    return module


def model_config_from_release(encoder, decoder, image_size: int) -> ml_collections.ConfigDict:
    """`config.model` of our DVAE with the sizes the released modules were built with."""
    for name in SHARED_SIZES:
        in_encoder, in_decoder = getattr(encoder, name), getattr(decoder, name)
        if in_encoder != in_decoder:
            raise SystemExit(f"the encoder's {name}={in_encoder} differs from the decoder's "
                             f"{name}={in_decoder}: the two files are not one dVAE")
    if (encoder.input_channels, decoder.output_channels) != (3, 3):
        raise SystemExit(f"the encoder reads {encoder.input_channels} and the decoder writes "
                         f"{decoder.output_channels} channels; this dVAE is RGB (3)")
    cfg = ml_collections.ConfigDict(dict(
        image_size=image_size, n_hid=encoder.n_hid, num_groups=encoder.group_count,
        blocks_per_group=encoder.n_blk_per_group, vocab_size=encoder.vocab_size,
        n_init=decoder.n_init))
    try:
        dvae.validate_model_config(cfg)
    except ValueError as e:
        raise SystemExit(f"--image_size {image_size}: {e}") from None
    return cfg


# --- mapping the weights --------------------------------------------------------------------

def release_key(path: tuple) -> tuple[str, str]:
    """Our parameter's path -> ("encoder" | "decoder", the dall_e state_dict key it comes from).

    e.g. ("encoder", "groups", 1, 0, "res_path", 2, "kernel") -> "blocks.group_2.block_1.
    res_path.conv_3.w": dall_e numbers groups, blocks and convolutions from 1.
    """
    part, *module, leaf = path
    match tuple(module):
        case ("input_conv",):
            name = "blocks.input"
        case ("output_conv",):
            name = "blocks.output.conv"
        case ("groups", int(group), int(block), "id_path"):
            name = f"blocks.group_{group + 1}.block_{block + 1}.id_path"
        case ("groups", int(group), int(block), "res_path", int(conv)):
            name = f"blocks.group_{group + 1}.block_{block + 1}.res_path.conv_{conv + 1}"
        case _:
            raise ValueError(f"no dall_e weight corresponds to parameter {path}")
    return part, f"{name}.{RELEASE_LEAF_NAMES[leaf]}"


def to_our_layout(weight: np.ndarray, leaf: str) -> np.ndarray:
    """torch's (out, in, kh, kw) kernel -> (kh, kw, in, out); biases are unchanged."""
    return weight.transpose(2, 3, 1, 0) if leaf == "kernel" else weight


def release_state_dicts(encoder, decoder) -> dict[str, dict[str, np.ndarray]]:
    def as_numpy(module):
        return {k: v.detach().float().cpu().numpy() for k, v in module.state_dict().items()}
    return {"encoder": as_numpy(encoder), "decoder": as_numpy(decoder)}


def converted_params(abstract_params: nnx.State, released: dict) -> nnx.State:
    """Our parameters (numpy, our layout) filled from the release; every released weight must
    find its parameter, with the shape our model expects, and none be left over."""
    unused = {(part, key) for part, weights in released.items() for key in weights}
    flat = []
    for path, variable in nnx.to_flat_state(abstract_params):
        part, key = release_key(path)
        if key not in released[part]:
            raise SystemExit(f"the released {part} has no weight {key!r} for our {path}")
        value = to_our_layout(released[part][key], path[-1])
        if value.shape != variable.shape:
            raise SystemExit(f"the released {part} weight {key!r} has shape "
                             f"{released[part][key].shape}; our {path} needs {variable.shape}")
        unused.discard((part, key))
        flat.append((path, variable.replace(value=value)))
    if unused:
        raise SystemExit(f"released weights with no place in our dVAE: {sorted(unused)}")
    return nnx.from_flat_state(flat)


# --- the workdir ----------------------------------------------------------------------------

def workdir_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """configs/dvae.py (the paper's recipe, should anyone fine-tune) with the release's sizes."""
    config = config_lib.load("dvae")
    config.model.update(model_config)
    config.data.image_size = config.data.shapes.image_size = model_config.image_size
    config.train.compute_dtype = "float32"  # the release's precision on a CPU
    return config


def initial_train_state(config, released: dict) -> state_lib.TrainState:
    """The train state a run would restore: step 0, fresh optimizer moments, EMA = weights."""
    _, abstract_params, rest = state_lib.split_model(
        nnx.eval_shape(lambda: dvae.from_config(config, nnx.Rngs(0))))
    if jax.tree.leaves(rest):
        raise RuntimeError("the dVAE gained non-parameter variables: the converter must set them")
    # device_put, not jnp.asarray: that compiles a staging program for every shape.
    params = jax.device_put(converted_params(abstract_params, released))
    tx, _ = optimizer.make_optimizer(config.optimizer, config.train.steps)
    zero = jnp.zeros((), jnp.int32)
    return state_lib.TrainState(
        # One compiled init: eagerly, each of its hundreds of zeros_like compiles on its own.
        step=zero, params=params, rest=rest, opt_state=jax.jit(tx.init)(params),
        ema=params if config.optimizer.ema_decay > 0 else None,
        nonfinite_total=zero, nonfinite_in_row=zero)


def write_workdir(directory: str, config, state, provenance: str) -> None:
    """The checkpoint first and the config last: a directory without config.json is no
    workdir, so an interrupted write never reads as a converted model."""
    checkpoint.save_state(directory, 0, state)
    files.write_text(files.join(directory, "CONVERTED_FROM.txt"), provenance)
    workdir_lib.write_config(config, directory)


def check_output_free(out: str) -> None:
    if files.path(workdir_lib.checkpoint_dir(out)).is_dir():
        raise SystemExit(f"--out {out!r} already holds a checkpoint: refusing to overwrite it")
    path = files.path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise SystemExit(f"--out {out!r} exists and is not an empty directory: refusing to "
                         "write into it")


def make_staging_dir(out: str) -> str:
    """An empty hidden directory beside local `out`, on the same file system so a rename
    publishes it, with the permissions of a directory a run would make."""
    parent = files.path(out).parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{files.path(out).name}.converting-{secrets.token_hex(4)}"
    staging.mkdir()
    return str(staging)


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with files.path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(encoder_path: str, decoder_path: str, out: str, image_size: int = 256) -> str:
    """Writes the converted workdir `out` (created whole, or not at all) and returns it.

    User errors are one-line SystemExits naming the culprit.
    """
    _, dall_e = import_dall_e()
    out = files.absolute(out)
    check_output_free(out)
    encoder = load_release_module(encoder_path, "--encoder", dall_e.Encoder)
    decoder = load_release_module(decoder_path, "--decoder", dall_e.Decoder)
    config = workdir_config(model_config_from_release(encoder, decoder, image_size))
    state = initial_train_state(config, release_state_dicts(encoder, decoder))
    provenance = "".join(f"{name}: {files.absolute(path)} sha256 {sha256(path)}\n"
                         for name, path in (("encoder", encoder_path), ("decoder", decoder_path)))

    # Locally, a hidden directory renamed into place publishes the workdir whole. An object
    # store cannot rename a directory: there the workdir is written in place, its config last.
    target = out if files.is_remote(out) else make_staging_dir(out)
    try:
        write_workdir(target, config, state, provenance)
        if target != out:
            check_output_free(out)  # again: something may have appeared meanwhile
            files.path(target).replace(out)  # replaces only a missing or empty directory
    except BaseException:
        files.path(target).rmtree(missing_ok=True)
        raise
    return out


def define_flags() -> None:
    flags.DEFINE_string("encoder", None, "OpenAI's encoder.pkl.")
    flags.DEFINE_string("decoder", None, "OpenAI's decoder.pkl.")
    flags.DEFINE_string("out", None, "The workdir to create; must not exist yet (or be empty).")
    flags.DEFINE_integer("image_size", 256, "The image side the workdir's config records "
                         "(default 256, the release's; the grid is image_size/8 with 4 groups).")
    flags.mark_flags_as_required(["encoder", "decoder", "out"])


def main(argv) -> None:
    del argv
    out = convert(flags.FLAGS.encoder, flags.FLAGS.decoder, flags.FLAGS.out,
                  flags.FLAGS.image_size)
    print(f"wrote {out}: use it as --config.task.dvae_workdir={out}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
