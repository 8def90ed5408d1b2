"""The paper's 12B transformer: 64 layers, 62 heads × 64 (d_model 3968), 256 caption tokens of a
16384-piece BPE (10% BPE dropout) + 32×32 image tokens of 8192 codes, batch 1024.

Sharded for a pod: FSDP over groups of 128 devices (d_model 3968 = 128·31, so 128 is the widest
FSDP split of the parameters), data parallel across groups, every layer rematerialised. On a
256-chip slice that is mesh (2, 128, 1): 12.4 GiB per chip at the peak of the train step by
`python -m dalle_jax.plan --config configs/dalle_12b.py --devices 256` (BENCHMARKS.md,
"Ahead-of-time plans for pods").

Point it at real data, e.g. --config.data.name=coco_captions
--config.data.caption_key=captions/text, or --config.data.name=caption_folder
--config.data.folder=/path/to/images, and at the paper-sized dVAE's workdir.

The paper does not state the MLP width: 4·d_model (GPT-3's ratio) would give 12.29B parameters
with the embeddings and heads, so mlp_dim is 15360 (3.87·d_model, a multiple of 1024), which
gives 12.03B, the paper's "12 billion".
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.dalle_base_config()
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

    config.task.dvae_workdir = "workdirs/dvae"
    config.model.update(dict(
        grid_size=32, image_vocab_size=8192, d_model=3968, num_heads=62, head_dim=64,
        mlp_dim=15360, depth=64, remat="full"))
    config.train.compute_dtype = "bfloat16"
    config.train.steps = 430_000
    config.train.images_every = 0  # the logged samples decode without a cache: too slow here
    # FSDP over groups of 128 devices, data parallel across the groups (see the docstring).
    config.mesh.shape = (-1, 128, 1)
    return config
