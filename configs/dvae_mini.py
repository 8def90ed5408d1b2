"""The CPU-sized dVAE: 32 px synthetic_shapes -> 8×8 tokens of a 512-code book.

Sized so that training on a 2-core CPU reconstructs every object's colour, shape and cell
(12,750 steps: about 14 minutes on a fast host, 20-33 on slower ones; BENCHMARKS.md, "dVAE
quality: objects kept"):

python train.py --config configs/dvae_mini.py --workdir workdirs/dvae_mini

(The main job, configs/pipeline_mini.py, trains it for 6000 steps with its schedules shortened,
to give CLIP more steps.)

Three departures from the paper's recipe, all measured on this data:

- The NLL is weighted by stop_gradient(b) (`nll_scale_power` = 1; with the paper's p = 0 the
  decoder gave objects a large scale b and stopped learning their colours within this budget).
- The KL weight rises to 0.5 rather than 6.6: a 4×4-pixel token carries a quarter of the
  paper's 8×8 token's pixel-channels, and the b-weighting scales the reconstruction term by b
  (median ≈ 0.05 here), so β acts far stronger than its face value; at 6.6 colours were lost.
- The KL weight then falls to 0.05 (`kl_weight_end`, over `kl_decay_steps`): once the codebook
  is in use, a weaker KL lets the encoder's posterior sharpen, so the codes the decoder trains
  on are the argmax codes it is given at inference.

The learning rate of 2e-3 and the 12,750 steps are what keep every object in all 1000
validation reconstructions (BENCHMARKS.md, "dVAE quality: objects kept"; other settings under
"What was tried and did not help").
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
    config.task.kl_weight = 0.5
    config.task.kl_warmup_steps = 750
    config.task.kl_weight_end = 0.05
    config.task.kl_decay_steps = 12000
    config.task.temperature_start = 1.0
    config.task.temperature_end = 1.0 / 16
    config.task.temperature_steps = 8250

    config.model.image_size = 32
    config.model.n_hid = 32  # widths 32, 64, 128
    config.model.num_groups = 3  # 32 -> 16 -> 8
    config.model.blocks_per_group = 1
    config.model.vocab_size = 512
    config.model.n_init = 64

    config.optimizer.learning_rate = 2e-3
    config.optimizer.end_learning_rate = 1e-5
    config.optimizer.warmup_steps = 100
    config.train.steps = 12750
    config.train.eval_every = 1000
    config.train.images_every = 1000
    config.train.checkpoint_every = 1000
    config.train.compute_dtype = "float32"
    return config
