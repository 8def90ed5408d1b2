"""Converting OpenAI's released dVAE: OpenAI's own modules (random weights, small sizes),
pickled whole as the released files are, must compute the same as our converted workdir."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import import_required_in_ci  # noqa: E402

torch = import_required_in_ci("torch", "PyTorch is not installed (the convert extra)")
dall_e = import_required_in_ci("dall_e", "OpenAI's dall_e package is not installed "
                               "(pip install --no-deps dall-e==0.1)")

from flax import nnx  # noqa: E402

from dalle_jax import config_lib  # noqa: E402
from dalle_jax import workdir as workdir_lib  # noqa: E402
from dalle_jax.convert import openai_dvae  # noqa: E402
from dalle_jax.models import dvae  # noqa: E402
from dalle_jax.models.codec import ImageCodec  # noqa: E402
from dalle_jax.pipeline import make_task  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The smallest the release's constructors allow (n_hid >= 64, vocab_size >= 512); 4 groups
# are built in, so 32 px images give a 4×4 grid.
SIZES = dict(n_hid=64, n_blk_per_group=1, vocab_size=512)
N_INIT, IMAGE_SIZE, GRID = 16, 32, 4


def release_modules(seed=0, **overrides):
    """dall_e's Encoder and Decoder with random weights and random (non-zero) biases."""
    torch.manual_seed(seed)
    sizes = dict(SIZES, **overrides)
    encoder = dall_e.Encoder(**sizes)
    decoder = dall_e.Decoder(n_init=N_INIT, **sizes)
    with torch.no_grad():
        for module in (encoder, decoder):
            for name, weight in module.named_parameters():
                if name.endswith(".b"):
                    weight.normal_(std=0.3)
    return encoder, decoder


def save(module, path):
    torch.save(module, path)  # the whole module, as OpenAI's files are
    return str(path)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(encoder, decoder, encoder.pkl, decoder.pkl, converted workdir)."""
    folder = tmp_path_factory.mktemp("release")
    encoder, decoder = release_modules()
    encoder_pkl, decoder_pkl = save(encoder, folder / "encoder.pkl"), save(decoder, folder / "decoder.pkl")
    workdir = openai_dvae.convert(encoder_pkl, decoder_pkl, str(folder / "converted"), IMAGE_SIZE)
    return encoder, decoder, encoder_pkl, decoder_pkl, workdir


@pytest.fixture(scope="module")
def codec(release):
    """The converted workdir loaded as the image tokenizer (small chunks: little padding)."""
    return ImageCodec.from_workdir(release[-1], chunk=4)


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def nhwc(t):
    return np.moveaxis(t.detach().numpy(), 1, -1)


def random_images(seed=0, batch=3):
    return np.random.default_rng(seed).integers(0, 256, (batch, IMAGE_SIZE, IMAGE_SIZE, 3),
                                                dtype=np.uint8)


def random_codes(seed=1, batch=3):
    return np.random.default_rng(seed).integers(0, SIZES["vocab_size"], (batch, GRID, GRID))


def torch_logits(encoder, images):
    with torch.no_grad():
        return nhwc(encoder(dall_e.map_pixels(nchw(images.astype(np.float32) / 255))))


def torch_decoder_output(decoder, codes):
    one_hot = np.eye(SIZES["vocab_size"], dtype=np.float32)[codes]
    with torch.no_grad():
        return nhwc(decoder(nchw(one_hot)))


def assert_close(ours, theirs):
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * max(1.0, np.abs(theirs).max()))


def assert_same_argmax(tokens, logits):
    """Tokens equal the argmax wherever the best two logits are not a float32 tie."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 1e-3 * max(1.0, np.abs(logits).max())
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(tokens)[clear], logits.argmax(-1)[clear])


# --- equivalence --------------------------------------------------------------------------

def test_config_is_derived_from_the_release(release):
    config = workdir_lib.read_config(release[-1])
    assert config.task.name == "dvae"
    assert dict(config.model) == dict(image_size=IMAGE_SIZE, n_hid=64, num_groups=4,
                                      blocks_per_group=1, vocab_size=512, n_init=N_INIT)
    assert config.data.image_size == IMAGE_SIZE and config.train.compute_dtype == "float32"


def test_encoder_logits_equal_the_release(release, codec):
    images = random_images()
    logits = nnx.jit(lambda model, x: model.encoder_logits(x))(codec.model, images)
    assert_close(logits, torch_logits(release[0], images))


def test_decoder_outputs_equal_the_release(release, codec):
    codes = random_codes()
    theirs = torch_decoder_output(release[1], codes)
    one_hot = np.eye(SIZES["vocab_size"], dtype=np.float32)[codes]
    mu, log_b = nnx.jit(lambda model, z: model.decode_logits(z))(codec.model, one_hot)
    assert_close(mu, theirs[..., :3])
    assert_close(log_b, theirs[..., 3:])


def test_codec_encodes_and_decodes_as_the_release(release, codec):
    encoder, decoder = release[:2]
    assert (codec.image_size, codec.grid_size, codec.vocab_size) == (IMAGE_SIZE, GRID, 512)
    images = random_images(seed=2, batch=5)
    assert_same_argmax(codec.encode(images), torch_logits(encoder, images))

    codes = random_codes(seed=3, batch=5)
    mu = torch.from_numpy(np.moveaxis(torch_decoder_output(decoder, codes)[..., :3], -1, 1))
    pictures = nhwc(dall_e.unmap_pixels(torch.sigmoid(mu)))
    assert_close(codec.decode(codes), pictures)


def test_workdir_serves_as_the_transformers_dvae(release):
    encoder, *_, workdir = release
    config = config_lib.load("dalle_mini")
    config.task.dvae_workdir = workdir
    config.model.update(grid_size=GRID, image_vocab_size=512)
    task = make_task(config)
    images = random_images(seed=4, batch=2)
    tokens = jax.jit(task.image_tokens)({"image": images, "frozen": task.frozen_state()})
    assert_same_argmax(np.asarray(tokens).reshape(2, GRID, GRID), torch_logits(encoder, images))


def test_command_line_writes_the_same_workdir(release, codec, tmp_path):
    _, _, encoder_pkl, decoder_pkl, _ = release
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "dalle_jax.convert.openai_dvae", "--encoder", encoder_pkl,
         "--decoder", decoder_pkl, "--out", str(out), "--image_size", str(IMAGE_SIZE)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--config.task.dvae_workdir={out}" in result.stdout
    cli_model = workdir_lib.Run(str(out)).load_model(dvae.from_config)
    for ours, theirs in zip(nnx.to_flat_state(nnx.state(cli_model)),
                            nnx.to_flat_state(nnx.state(codec.model))):
        assert ours[0] == theirs[0]
        np.testing.assert_array_equal(np.asarray(ours[1][...]), np.asarray(theirs[1][...]))


def test_help_warns_that_unpickling_runs_code():
    result = subprocess.run([sys.executable, "-m", "dalle_jax.convert.openai_dvae", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = " ".join(result.stdout.split())  # absl's --help exits with 1 after the usage
    assert "Unpickling runs code from the file" in text and "trust" in text


def test_the_released_sizes_give_the_papers_config():
    """The default constructors are the released model's sizes: configs/dvae.py's model, and
    every weight has its place (shapes only: nothing is computed at 256 px)."""
    torch.manual_seed(0)
    encoder, decoder = dall_e.Encoder(), dall_e.Decoder()
    model_config = openai_dvae.model_config_from_release(encoder, decoder, 256)
    assert dict(model_config) == dict(config_lib.load("dvae").model)
    abstract = nnx.state(nnx.eval_shape(lambda: dvae.DVAE(model_config, rngs=nnx.Rngs(0))),
                         nnx.Param)
    params = openai_dvae.converted_params(
        abstract, openai_dvae.release_state_dicts(encoder, decoder))
    kernel = params["encoder"]["input_conv"]["kernel"][...]
    assert kernel.shape == (7, 7, 3, 256)
    np.testing.assert_array_equal(kernel[:, :, 1, 5], encoder.blocks.input.w[5, 1].detach().numpy())


# --- errors -------------------------------------------------------------------------------

def convert_error(tmp_path, encoder_pkl, decoder_pkl, out=None) -> str:
    out = out or str(tmp_path / "out")
    with pytest.raises(SystemExit) as failure:
        openai_dvae.convert(encoder_pkl, decoder_pkl, out, IMAGE_SIZE)
    message = str(failure.value)
    assert "\n" not in message
    assert not [name for name in os.listdir(os.path.dirname(out)) if ".converting-" in name]
    return message


def test_missing_file_is_named(release, tmp_path):
    missing = str(tmp_path / "nowhere.pkl")
    message = convert_error(tmp_path, release[2], missing)
    assert "--decoder" in message and missing in message and "no such file" in message
    assert not os.path.exists(tmp_path / "out")


def test_wrong_pickle_contents_are_named(release, tmp_path):
    encoder, decoder, encoder_pkl, decoder_pkl, _ = release
    state_dict = save(encoder.state_dict(), tmp_path / "state_dict.pkl")
    assert "holds a collections.OrderedDict, not a dall_e.Encoder" in convert_error(
        tmp_path, state_dict, decoder_pkl)
    assert "--encoder" in convert_error(tmp_path, decoder_pkl, decoder_pkl)  # swapped
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    assert "is not a loadable PyTorch pickle" in convert_error(tmp_path, encoder_pkl, str(garbage))
    assert not os.path.exists(tmp_path / "out")


def test_encoder_and_decoder_of_different_models_are_refused(release, tmp_path):
    _, wider = release_modules(n_hid=128)
    message = convert_error(tmp_path, release[2], save(wider, tmp_path / "wider.pkl"))
    assert "n_hid=64 differs from the decoder's n_hid=128" in message


def test_an_existing_checkpoint_is_not_overwritten(release, tmp_path):
    _, _, encoder_pkl, decoder_pkl, workdir = release
    before = sorted(os.walk(workdir))
    message = convert_error(tmp_path, encoder_pkl, decoder_pkl, out=workdir)
    assert "already holds a checkpoint" in message and workdir in message
    assert sorted(os.walk(workdir)) == before


def test_a_failed_write_leaves_nothing_behind(release, tmp_path, monkeypatch):
    def fail_halfway(directory, *args):
        open(os.path.join(directory, "config.json"), "w").close()
        raise OSError("disk full")

    monkeypatch.setattr(openai_dvae, "write_workdir", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        openai_dvae.convert(release[2], release[3], str(tmp_path / "out"), IMAGE_SIZE)
    assert os.listdir(tmp_path) == []


def test_missing_packages_say_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dall_e", None)  # makes `import dall_e` fail
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[convert\]"'):
        openai_dvae.import_dall_e()
