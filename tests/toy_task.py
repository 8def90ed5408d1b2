"""A tiny task for testing the training loop's mechanics quickly and independently of models.

A linear autoencoder over 8x8-downsampled images whose weights carry logical axes, so FSDP and
tensor sharding really split them.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from dalle_jax.tasks.task import Task


class LinearAutoencoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, features: int = 192, hidden: int = 16):
        init = nnx.initializers.normal(0.05)
        self.down = nnx.Linear(features, hidden, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
        self.up = nnx.Linear(hidden, features, rngs=rngs,
                             kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))

    def __call__(self, x):
        return self.up(jax.nn.relu(self.down(x)))


def features(images):
    x = images.astype(jnp.float32) / 255.0
    b, s = x.shape[0], x.shape[1]
    return x.reshape(b, 8, s // 8, 8, s // 8, 3).mean(axis=(2, 4)).reshape(b, -1)


class ToyTask(Task):
    name = "toy"

    def __init__(self, noise: float = 0.01):
        self.noise = noise

    def build_model(self, rngs):
        return LinearAutoencoder(rngs)

    def loss(self, model, batch, rng, step):
        x = features(batch["image"])
        noise = self.noise * jax.random.normal(rng, x.shape)  # Uses the step's key, as real tasks do.
        err = jnp.mean((model(x + noise) - x) ** 2, axis=-1)
        mask = batch["mask"].astype(jnp.float32)
        loss = jnp.sum(err * mask) / jnp.maximum(mask.sum(), 1.0)
        return loss, {"mse": loss}

    def eval_sums(self, model, batch):
        x = features(batch["image"])
        mask = batch["mask"].astype(jnp.float32)
        return {"squared_error": jnp.sum(jnp.mean((model(x) - x) ** 2, -1) * mask),
                "count": mask.sum()}

    def summarize(self, sums):
        return {"mse": float(sums["squared_error"] / sums["count"])}

    def log_images(self, model, batch):
        return jnp.concatenate(list(batch["image"][:4]), axis=1)
