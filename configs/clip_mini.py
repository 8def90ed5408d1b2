"""The CPU-sized CLIP on 32 px synthetic_shapes: 8×8 patches (a 4×4 grid), 24 caption tokens.

python train.py --config configs/clip_mini.py --workdir workdirs/clip_mini

No flips (captions say "left of"); the caption tokenizer is trained into the workdir as for
the transformer (same vocabulary size and length as configs/dalle_mini.py).

Image tower: 8×8-pixel patches at width 128, which read shapes, places and relations better
than 4×4 patches at width 64 in the same step time (BENCHMARKS.md, "What was tried and did not
help"). Relations are learned late, after about 3,000 steps, so the main job
(configs/pipeline_mini.py) trains this config for 6,000 (BENCHMARKS.md, "CLIP quality:
retrieval and zero-shot").
"""
from dalle_jax import config_lib


def get_config():
    config = config_lib.clip_base_config()
    config.data.name = "synthetic_shapes"
    config.data.shapes.image_size = 32
    config.data.image_size = 32
    config.data.batch_size = 64
    # Two read threads, not eight: on the 2-core CPU the loader's Python threads compete with
    # the step (BENCHMARKS.md, "CLIP speed"). The batches are the same.
    config.data.read_threads = 2
    config.data.augment.flip = False
    # Hard negative captions (text/contrast.py): one colour, shape or place word changed or
    # two swapped, the kind of word drawn first (so a relation is edited as often as a
    # colour). The held-out colour-shape pairs (synthetic_shapes.HELDOUT_PAIRS) never appear
    # in them: those pairs must stay unseen, as text too.
    config.data.contrast_words = (
        ("red", "green", "blue", "yellow", "magenta", "cyan"), ("circle", "square", "triangle"),
        ("above", "below"), ("left", "right"), ("top", "bottom"))
    config.data.contrast_excluded = ("yellow triangle", "blue circle", "cyan square",
                                     "magenta circle")
    # A quarter of each batch's captions also meet their own scene with named objects taken
    # out (the data set's pixels): a reranker must not score an empty picture for "a yellow
    # triangle" above one showing it (tasks/clip.py; `dalle_jax.evaluate`'s missing-object
    # check). Every negative image costs the image tower a pass; 16 of 64 add about 15%.
    config.data.missing_object_negatives = 16
    config.text.length = 24
    config.text.vocab_size = 128

    config.model.update(dict(
        patch_size=8,
        image_width=128, image_depth=4, image_heads=4, image_mlp_ratio=2.0,
        image_pooling="mean",
        text_width=64, text_depth=2, text_heads=2, text_mlp_ratio=2.0,
        embed_dim=128))
    config.optimizer.update(dict(
        learning_rate=1e-3, warmup_steps=200, end_learning_rate=1e-5, weight_decay=0.1,
        ema_decay=0.99))
    config.train.steps = 3000
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.images_every = 500
    config.train.checkpoint_every = 500
    return config
