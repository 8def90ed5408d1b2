"""A pod-sized CLIP: a ViT-B/16-like image tower at 256 px (16×16 patches of 16 px, width 768,
12 layers, 12 heads) and CLIP's text tower (12 layers, width 512, 8 heads) over 256 caption
tokens of a 16384-piece BPE, a 512-dimensional joint space, and a global batch of 32768 (the
CLIP paper's), so every step contrasts each image with 32767 wrong captions.

Data parallel over the whole pod (the ≈133M parameters fit every device), bfloat16 compute,
every layer rematerialised. Point it at real data, e.g. --config.data.name=coco_captions
--config.data.caption_key=captions/text, or --config.data.name=caption_folder
--config.data.folder=/path/to/images.
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.clip_base_config()
    config.data.name = "synthetic_shapes"
    config.data.shapes.image_size = 256
    config.data.image_size = 256
    config.data.batch_size = 32768
    config.data.augment.square = "center"
    config.data.augment.min_scale = 1.0
    config.data.augment.max_scale = 1.125
    config.data.augment.flip = False
    config.data.workers = 8
    config.text.length = 256
    config.text.vocab_size = 16384

    config.model.update(dict(
        patch_size=16,
        image_width=768, image_depth=12, image_heads=12, image_mlp_ratio=4.0,
        image_pooling="class",
        text_width=512, text_depth=12, text_heads=8, text_mlp_ratio=4.0,
        embed_dim=512, remat="full"))
    config.train.compute_dtype = "bfloat16"
    config.train.steps = 100_000
    config.train.eval_every = 2000
    config.train.images_every = 2000
    config.train.checkpoint_every = 2000
    config.mesh.shape = (-1, 1, 1)
    return config
