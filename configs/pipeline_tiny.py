"""configs/pipeline_mini.py shrunk for the tests: every stage in about a minute on 2 cores.

python train.py --config configs/pipeline_tiny.py --workdir /tmp/tiny

300 training images; crude models (a few dozen steps each), but every stage, file and
hand-over of the real pipeline.
"""
import importlib.util
import os


def _pipeline_mini():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline_mini.py")
    spec = importlib.util.spec_from_file_location("pipeline_mini", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config():
    config = _pipeline_mini()
    config.text.update(dict(length=20, vocab_size=64))
    # Every stage, the optional grey CLIP too: the samples are reranked by both CLIPs.
    config.stages = ("dvae", "clip", "grey_clip", "dalle")
    for stage in config.stages:
        data = config[stage].data
        data.shapes.update(dict(num_train=300, num_validation=100, num_heldout=60))
        data.batch_size = 32 if stage.endswith("clip") else 16

    dvae = config.dvae
    dvae.model.update(dict(n_hid=16, vocab_size=128, n_init=32))
    dvae.task.update(dict(kl_warmup_steps=20, temperature_steps=40, kl_weight_end=None))
    dvae.optimizer.update(dict(warmup_steps=0, learning_rate=2e-3, ema_decay=0.9))
    dvae.train.update(dict(steps=80, log_every=10, eval_every=80, eval_batches=2,
                           images_every=0, checkpoint_every=100))

    for clip, steps in ((config.clip, 80), (config.grey_clip, 40)):
        clip.model.update(dict(image_width=32, image_depth=2, image_heads=1, image_mlp_ratio=2,
                               text_width=32, text_depth=1, text_heads=1, text_mlp_ratio=2,
                               embed_dim=32))
        clip.optimizer.update(dict(learning_rate=3e-3, warmup_steps=10, ema_decay=0.0))
        clip.train.update(dict(steps=steps, log_every=40, eval_every=steps, eval_batches=0,
                               images_every=steps, checkpoint_every=1000))

    dalle = config.dalle
    dalle.model.update(dict(image_vocab_size=128, d_model=64, num_heads=4, head_dim=16,
                            mlp_dim=128))
    dalle.optimizer.update(dict(warmup_steps=5, learning_rate=3e-3))
    dalle.train.update(dict(steps=60, log_every=20, eval_every=60, eval_batches=3,
                            images_every=60, checkpoint_every=30))

    config.samples.update(dict(prompts=config.samples.prompts[:2], candidates=4, keep=2,
                               batch_size=8))
    return config
