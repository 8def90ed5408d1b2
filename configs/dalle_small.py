"""A DALL·E transformer for one accelerator host (≈120M parameters): 256 px images as 32×32
tokens of the paper's 8192-code dVAE, 128 caption tokens, 12 layers of width 768.

python train.py --config configs/dalle_small.py --workdir DIR \
    --config.task.dvae_workdir=DVAE_DIR --config.data.name=caption_folder --config.data.folder=...
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.dalle_base_config()
    config.data.name = "synthetic_shapes"
    config.data.shapes.image_size = 256
    config.data.image_size = 256
    config.data.batch_size = 128
    config.data.augment.square = "center"
    config.data.augment.max_scale = 1.125
    config.data.workers = 4
    config.text.length = 128
    config.text.vocab_size = 16384
    config.text.bpe_dropout = 0.1

    config.task.dvae_workdir = "workdirs/dvae"
    config.model.update(dict(
        grid_size=32, image_vocab_size=8192, d_model=768, num_heads=12, head_dim=64,
        mlp_dim=3072, depth=12, remat="save_dots"))
    config.train.compute_dtype = "bfloat16"
    config.train.steps = 100_000
    config.train.images_every = 0
    # Data parallel over the host's devices, parameters FSDP-split across them.
    config.mesh.shape = (1, -1, 1)
    return config
