"""The CPU-sized dVAE: 32 px synthetic_shapes -> 8×8 tokens of a 512-code book.

Sized so that training on a 2-core CPU (about 0.13 s a step) reconstructs every object's colour,
shape and cell within about ten minutes:

python train.py --config configs/dvae_mini.py --workdir workdirs/dvae_mini

Two departures from the paper's recipe, both measured on this data: the KL weight is 1 rather
than 6.6 (a 4×4-pixel token carries a quarter of the pixel-channels of the paper's 8×8 one, so
the same β taxes its information 4× harder, and at 6.6 colours were lost), and the NLL is
weighted by stop_gradient(b) (`nll_scale_power` = 1; with the paper's p = 0 the decoder gave
objects a large scale b and stopped learning their colours within this budget).
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.base_config()
    config.data.name = "synthetic_shapes"
    config.data.shapes.image_size = 32
    config.data.image_size = 32
    config.data.batch_size = 16
    # The dVAE sees images only, so flips are harmless (the transformer stage has none).
    config.data.augment.flip = True

    config.task.name = "dvae"
    config.task.logit_laplace_eps = 0.1
    config.task.nll_scale_power = 1.0
    config.task.kl_weight = 1.0
    config.task.kl_warmup_steps = 500
    config.task.temperature_start = 1.0
    config.task.temperature_end = 1.0 / 16
    config.task.temperature_steps = 3500

    config.model.image_size = 32
    config.model.n_hid = 32  # widths 32, 64, 128
    config.model.num_groups = 3  # 32 -> 16 -> 8
    config.model.blocks_per_group = 1
    config.model.vocab_size = 512
    config.model.n_init = 64

    config.optimizer.learning_rate = 1e-3
    config.optimizer.end_learning_rate = 1e-5
    config.optimizer.warmup_steps = 100
    config.train.steps = 5000
    config.train.eval_every = 1000
    config.train.images_every = 1000
    config.train.checkpoint_every = 1000
    config.train.compute_dtype = "float32"
    return config
