"""What the image server draws: requests checked, turned into rows, batched, reranked, encoded.

    service = ImageService.from_workdir("workdirs/mini")    # a pipeline or transformer workdir
    images = service.generate(ImageRequest(prompt="a red circle", n=2, seed=0))  # PNG bytes

A request of n images becomes n rows (caption ids, seed, index i), or `rerank` rows of which
CLIP keeps the best n. Rows of every waiting request that share sampling settings are drawn
together by one compiled call (`batcher.Batcher`); image i of a request uses the key
fold_in(key(seed), i), so what a request gets never depends on what it was batched with, and
equals `Generator(...)(prompt, n, seed)` (or `best_of`) for the same prompt and seed.
Images are drawn at the model's size and enlarged to the requested one by repeating pixels
(nearest neighbour: the model's pixels, not an upscaler's guesses).
"""
from __future__ import annotations

import dataclasses
import secrets

import numpy as np

from dalle_jax import files
from dalle_jax.sampling.generator import Generator, Settings
from dalle_jax.sampling.outputs import to_pixels
from dalle_jax.sampling.rerank import top_k_indices
from dalle_jax.serving.batcher import Batcher

OPENAI_SIZES = (256, 512, 1024)
MAX_SEED = 2**31 - 1


class RequestError(ValueError):
    """A request the server cannot draw, naming the field (`param`) at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    prompt: str
    n: int = 1
    size: str = "1024x1024"
    seed: int | None = None  # None: a fresh random seed
    guidance: float | None = None  # None: the server's default
    rerank: int = 0  # candidates drawn for CLIP to keep the best n of; 0 = no reranking


@dataclasses.dataclass(frozen=True)
class Limits:
    max_n: int = 10
    max_candidates: int = 64
    max_guidance: float = 20.0


def enlarge(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 (S, S, 3) -> (size, size, 3) by repeating each pixel size/S times."""
    factor = size // pixels.shape[0]
    return np.repeat(np.repeat(pixels, factor, axis=0), factor, axis=1)


class ImageService:
    def __init__(self, generator: Generator, *, default_guidance: float = 1.0,
                 limits: Limits = Limits(), max_waiting: int = 64):
        self.generator, self.default_guidance, self.limits = generator, default_guidance, limits
        self.image_size = generator.codec.image_size
        self.sizes = tuple(sorted({self.image_size} | {s for s in OPENAI_SIZES
                                                       if s % self.image_size == 0}))
        self.batcher = Batcher(self._draw_rows, generator.batch_size, max_waiting)

    @classmethod
    def from_workdir(cls, workdir: str, *, clip_workdir: str | None = None,
                     batch_size: int = 8, dtype: str | None = None, **kwargs) -> "ImageService":
        """A pipeline workdir (its transformer, its CLIPs for `rerank`) or a transformer's
        (with `clip_workdir` for `rerank`); `dtype`: the transformer's inference dtype."""
        generator = Generator.from_workdir(workdir, batch_size=batch_size,
                                           clip_workdir=clip_workdir, dtype=dtype)
        return cls(generator, **kwargs)

    @property
    def can_rerank(self) -> bool:
        return self.generator.scorer is not None

    def describe(self) -> dict:
        return {"image_size": self.image_size, "sizes": [f"{s}x{s}" for s in self.sizes],
                "max_n": self.limits.max_n, "rerank": self.can_rerank,
                "max_candidates": self.limits.max_candidates,
                "default_guidance": self.default_guidance,
                "text_length": self.generator.text_length}

    # --- checking -----------------------------------------------------------------------

    def size_of(self, size: str) -> int:
        sides = size.split("x") if isinstance(size, str) else []
        if len(sides) != 2 or sides[0] != sides[1] or int(sides[0]) not in self.sizes:
            raise RequestError(f"size {size!r} is not one of "
                               f"{', '.join(f'{s}x{s}' for s in self.sizes)}", "size")
        return int(sides[0])

    def check(self, request: ImageRequest) -> None:
        """A RequestError naming the first field this server cannot draw."""
        limits = self.limits
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise RequestError("prompt is empty", "prompt")
        needed = self.generator.tokenizer.count(request.prompt)
        if needed > self.generator.text_length:
            raise RequestError(f"prompt needs {needed} tokens, the model reads at most "
                               f"{self.generator.text_length}", "prompt")
        if not 1 <= request.n <= limits.max_n:
            raise RequestError(f"n={request.n} must be between 1 and {limits.max_n}", "n")
        self.size_of(request.size)
        if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
            raise RequestError(f"seed={request.seed} must be between 0 and {MAX_SEED}", "seed")
        guidance = request.guidance
        if guidance is not None and not 0 <= guidance <= limits.max_guidance:
            raise RequestError(f"guidance={guidance} must be between 0 and "
                               f"{limits.max_guidance}", "guidance")
        if request.rerank < 0:
            raise RequestError(f"rerank={request.rerank} must be >= 0 (0 = off)", "rerank")
        if request.rerank and not self.can_rerank:
            raise RequestError("rerank needs a CLIP model: start the server with a pipeline "
                               "workdir or --clip_workdir", "rerank")
        if request.rerank and not request.n <= request.rerank <= limits.max_candidates:
            raise RequestError(f"rerank={request.rerank} candidates must be between n="
                               f"{request.n} and {limits.max_candidates}", "rerank")

    # --- drawing ------------------------------------------------------------------------

    def submit(self, request: ImageRequest):
        """(future of the drawn images, the request with its seed and guidance filled in).
        Raises RequestError for a bad request and batcher.QueueFull when the queue is full."""
        self.check(request)
        request = dataclasses.replace(
            request, seed=secrets.randbelow(MAX_SEED + 1) if request.seed is None else request.seed,
            guidance=self.default_guidance if request.guidance is None else request.guidance)
        ids = self.generator.encode_prompts([request.prompt])[0]
        rows = [(ids, request.seed, i) for i in range(request.rerank or request.n)]
        return self.batcher.submit(Settings(guidance=request.guidance), rows), request

    def _draw_rows(self, settings: Settings, rows: list) -> list[np.ndarray]:
        text = np.stack([ids for ids, _, _ in rows])
        tokens = self.generator.draw_batch(text, [seed for _, seed, _ in rows],
                                           [index for _, _, index in rows], settings)
        grid = self.generator.model.cfg.grid_size
        return list(self.generator.codec.decode(tokens.reshape(-1, grid, grid)))

    def finish(self, request: ImageRequest, images: list[np.ndarray]) -> list[bytes]:
        """The drawn images of a request (reranked, enlarged) as PNG files."""
        images = np.stack(images)
        if request.rerank:
            scores = self.generator.scorer.score(images, [request.prompt] * len(images))
            images = images[top_k_indices(scores[None], request.n)[0]]
        size = self.size_of(request.size)
        return [files.png_bytes(enlarge(pixels, size)) for pixels in to_pixels(images)]

    def generate(self, request: ImageRequest) -> list[bytes]:
        """Blocking: the request's images as PNG files."""
        future, request = self.submit(request)
        return self.finish(request, future.result())

    def close(self) -> None:
        self.batcher.close()
