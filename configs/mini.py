"""The CPU-sized config the tests use: 32 px synthetic_shapes, a small vocabulary, batch 32.

python train.py --config configs/mini.py --workdir /tmp/dalle_mini
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.data.name = "synthetic_shapes"
    config.data.shapes.image_size = 32
    config.data.image_size = 32
    config.data.batch_size = 32
    config.text.length = 32
    config.text.vocab_size = 128
    return config
