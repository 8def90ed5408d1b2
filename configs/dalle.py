"""The paper-sized input side: 256 px images, 256 caption tokens of a 16384-piece BPE, batch 1024.

Data, text and mesh of the 12B run; its model section arrives with the transformer.
Point it at real data, e.g. --config.data.name=coco_captions --config.data.caption_key=captions/text,
or --config.data.name=caption_folder --config.data.folder=/path/to/images.
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.data.name = "synthetic_shapes"
    config.data.shapes.image_size = 256
    config.data.image_size = 256
    config.data.batch_size = 1024
    # Transformer-stage augmentation: centre-ish square crop, side in [1, 9/8]·256, no flip.
    config.data.augment.square = "center"
    config.data.augment.min_scale = 1.0
    config.data.augment.max_scale = 1.125
    config.data.augment.flip = False
    config.data.workers = 8
    config.text.length = 256
    config.text.vocab_size = 16384
    config.text.bpe_dropout = 0.1
    # FSDP over every device of a host group, data parallel across them.
    config.mesh.shape = (-1, 16, 1)
    return config
