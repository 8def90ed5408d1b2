"""The CPU-sized DALL·E transformer on 32 px synthetic_shapes (8×8 dVAE tokens of 512 codes).

Needs a trained dVAE first (configs/dvae_mini.py):

python train.py --config configs/dvae_mini.py --workdir workdirs/dvae_mini
python train.py --config configs/dalle_mini.py --workdir workdirs/dalle_mini
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.dalle_base_config()
    config.data.name = "synthetic_shapes"
    config.data.shapes.image_size = 32
    config.data.image_size = 32
    config.data.batch_size = 32
    config.text.length = 24
    config.text.vocab_size = 128
    # The data set's pictures are 32 px, so the paper's random side (up to 9/8 of 32, capped
    # at the 32 px crop) never changed a view: with it fixed, each image is encoded into tokens
    # once instead of in every step (the encoding was 0.12-0.14 of the step; BENCHMARKS.md,
    # "The main job's train steps").
    config.data.augment.max_scale = 1.0
    config.task.token_cache = True

    config.task.dvae_workdir = "workdirs/dvae_mini"
    config.model.update(dict(
        grid_size=8, image_vocab_size=512, d_model=128, num_heads=4, head_dim=32, mlp_dim=512,
        depth=4, conv_kernel=5,
        # The four layers unrolled: the loop over layers, which slices and stacks each layer's
        # parameters and activations, cost 10% of the train step on the 2-core CPU
        # (BENCHMARKS.md, "Transformer train step and compile time").
        scan_unroll=4))
    config.optimizer.learning_rate = 1e-3
    config.optimizer.warmup_steps = 100
    config.optimizer.schedule = "cosine"
    config.optimizer.end_learning_rate = 1e-5
    config.train.steps = 3000
    config.train.eval_every = 500
    config.train.images_every = 500
    config.train.checkpoint_every = 500
    return config
