"""The CPU-sized CLIP on 32 px synthetic_shapes: 4×4 patches (an 8×8 grid), 24 caption tokens.

python train.py --config configs/clip_mini.py --workdir workdirs/clip_mini

No flips (captions say "left of"); the caption tokenizer is trained into the workdir as for
the transformer (same vocabulary size and length as configs/dalle_mini.py).

Measured on the 2-core CPU with nothing else running (BENCHMARKS.md): the train step takes
0.20 s at batch 64 (4.7 GFLOP by formula), 0.23 s in the loop; 3,000 steps took 12.7 minutes.
Zero-shot accuracy on the 490 single-object validation images (EMA weights, logged at every
evaluation): colour 100% and shape 98.4% at step 1500, 100% / 95.5% at step 3000;
text->image recall@1 within batches of 64 0.73 at step 3000 (chance 0.016).
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.clip_base_config()
    config.data.name = "synthetic_shapes"
    config.data.shapes.image_size = 32
    config.data.image_size = 32
    config.data.batch_size = 64
    config.data.augment.flip = False
    # Hard negative captions (text/contrast.py): one colour, shape or place word changed or
    # two swapped. The held-out colour-shape pairs (synthetic_shapes.HELDOUT_PAIRS) never
    # appear in them: those pairs must stay unseen, as text too.
    config.data.contrast_words = (
        ("red", "green", "blue", "yellow", "magenta", "cyan"), ("circle", "square", "triangle"),
        ("above", "below"), ("left", "right"), ("top", "bottom"))
    config.data.contrast_excluded = ("yellow triangle", "blue circle", "cyan square",
                                     "magenta circle")
    config.text.length = 24
    config.text.vocab_size = 128

    config.model.update(dict(
        patch_size=4,
        image_width=64, image_depth=4, image_heads=2, image_mlp_ratio=2.0,
        image_pooling="mean",
        text_width=64, text_depth=2, text_heads=2, text_mlp_ratio=2.0,
        embed_dim=64))
    config.optimizer.update(dict(
        learning_rate=1e-3, warmup_steps=200, end_learning_rate=1e-5, weight_decay=0.1,
        ema_decay=0.99))
    config.train.steps = 3000
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.images_every = 500
    config.train.checkpoint_every = 500
    return config
