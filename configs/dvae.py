"""The paper's dVAE: 256 px -> 32×32 tokens of an 8192-code book (encoder ≈54M, decoder ≈44M).

Optimisation as in the paper's appendix: AdamW β=(0.9, 0.999), ε 1e-8, weight decay 1e-4,
EMA 0.999, batch 512, 3M updates; the learning rate is cosine-annealed from 1e-4 to 1.25e-6
(the paper anneals over the first 1.2M updates; the shared optimizer section anneals over
train.steps). KL weight β 0 -> 6.6 over 5,000 updates, temperature 1 -> 1/16 over 150,000.

python train.py --config configs/dvae.py --workdir gs://bucket/dvae \
    --config.data.name=caption_folder --config.data.folder=/path/to/images
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.data.name = "synthetic_shapes"
    config.data.shapes.image_size = 256
    config.data.image_size = 256
    config.data.batch_size = 512
    # dVAE augmentation: random square crop, resize to a side in [9/8, 12/8]·256, random
    # 256 crop, horizontal flip (the dVAE never sees captions, so flips cannot contradict one).
    config.data.augment.square = "random"
    config.data.augment.min_scale = 1.125
    config.data.augment.max_scale = 1.5
    config.data.augment.flip = True
    config.data.workers = 8

    config.task.name = "dvae"
    config.task.logit_laplace_eps = 0.1
    config.task.nll_scale_power = 0.0  # the paper's likelihood, unweighted
    config.task.kl_weight = 6.6
    config.task.kl_warmup_steps = 5_000
    config.task.temperature_start = 1.0
    config.task.temperature_end = 1.0 / 16
    config.task.temperature_steps = 150_000

    config.model.image_size = 256
    config.model.n_hid = 256
    config.model.num_groups = 4  # 256 -> 128 -> 64 -> 32
    config.model.blocks_per_group = 2
    config.model.vocab_size = 8192
    config.model.n_init = 128

    config.optimizer.learning_rate = 1e-4
    config.optimizer.schedule = "cosine"
    config.optimizer.warmup_steps = 0
    config.optimizer.end_learning_rate = 1.25e-6
    config.optimizer.b1, config.optimizer.b2, config.optimizer.eps = 0.9, 0.999, 1e-8
    config.optimizer.weight_decay = 1e-4
    config.optimizer.clip_norm = 0.0  # the paper does not clip the dVAE's gradients
    config.optimizer.ema_decay = 0.999
    config.train.steps = 3_000_000
    config.train.compute_dtype = "bfloat16"

    # FSDP within groups of 16 devices (the narrowest sharded width, 64 channels, divides by
    # it), data parallel across the groups.
    config.mesh.shape = (-1, 16, 1)
    return config
