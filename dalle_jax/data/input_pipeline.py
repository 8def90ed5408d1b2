"""The input pipeline: TFDS ArrayRecord -> this host's shard -> augment -> tokenize -> global batches.

Grain's dataset API reads the records: each process takes a disjoint slice of the split, every
example's random generator derives from (seed, position in the stream), so the batches do not
depend on the number of worker processes, and the iterator's state is a small dict that
resumes the stream exactly. The last stage assembles every host's examples into one `jax.Array` sharded over
the mesh's batch axes, a few batches ahead of the training step.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from typing import Iterator

import grain
import jax
import numpy as np
from absl import flags

from dalle_jax.data import augment, sources, synthetic_shapes
from dalle_jax.sharding import logical
from dalle_jax.text.contrast import contrast_caption
from dalle_jax.text.tokenizer import Tokenizer


class PrepareExample(grain.transforms.RandomMap):
    """One (position in the split, record) -> {'image': uint8 SxSx3, 'text': int32 ids,
    'mask': True, 'index': int32 position (where a token cache finds the image's tokens)}; with
    `config.data.contrast_words`, also 'negative_text' (k, length): k = `contrast_count`
    different captions, each the caption made false by one edit, and 'negative_mask' (k,):
    False for a slot left without one (the caption had no word to edit, or fewer than k
    different edits). With `config.data.augment.greyscale` = p, a training view is grey with
    probability p and its caption loses the `colour_words` (the negatives are made from that
    caption). With `config.data.missing_object_negatives` (synthetic_shapes), also
    'negative_image': the same view of the scene with some of its named objects taken out
    (one of `synthetic_shapes.removals`, uniformly), which the caption no longer describes
    (every example has one; the CLIP task uses those of the batch's first N)."""

    def __init__(self, data_config, text_config, tokenizer: Tokenizer, training: bool,
                 images: bool = True):
        """`images=False`: examples without 'image' (a step that reads none, e.g. one that
        looks its image tokens up in a cache), the records' images left undecoded."""
        self.data_config = data_config
        self.images = images
        self.tokenizer = tokenizer
        self.text_length = text_config.length
        self.bpe_dropout = text_config.bpe_dropout if training else 0.0
        self.training = training
        self.contrast_groups = [tuple(group) for group in data_config.get("contrast_words", ())]
        self.contrast_excluded = tuple(data_config.get("contrast_excluded", ()))
        self.contrast_count = int(data_config.get("contrast_count", 1))
        self.missing_object_negatives = data_config.get("missing_object_negatives", 0) > 0
        if not images and (self.contrast_groups or self.missing_object_negatives):
            raise ValueError("config.data.contrast_words and missing_object_negatives make "
                             "CLIP's negatives, which need the examples' images")

    def _tokens(self, caption: str, rng: np.random.Generator) -> np.ndarray:
        return self.tokenizer.encode(caption, self.text_length, dropout=self.bpe_dropout,
                                     seed=int(rng.integers(2**31)))

    def random_map(self, indexed, rng: np.random.Generator):
        index, record = indexed
        cfg = self.data_config
        if not self.images:
            caption = sources.pick_caption(sources.feature(record, cfg.caption_key),
                                           rng if self.training else None)
            return {"text": self._tokens(caption, rng), "mask": np.bool_(True),
                    "index": np.int32(index)}
        image, caption = sources.image_and_caption(record, cfg, rng if self.training else None)
        images = [image]
        if self.missing_object_negatives:
            images.append(synthetic_shapes.without_objects(
                image, record["objects"], self._removed(record["objects"], rng)))
        if self.training:
            aug = cfg.augment
            images = augment.augment_alike(images, cfg.image_size, rng, square=aug.square,
                                           min_scale=aug.min_scale, max_scale=aug.max_scale,
                                           flip=aug.flip)
            if aug.get("greyscale", 0.0) and rng.random() < aug.greyscale:
                images = [augment.greyscale(view) for view in images]
                caption = augment.without_words(caption, aug.colour_words)
        else:
            images = [augment.center_view(view, cfg.image_size) for view in images]
        example = {"image": images[0], "text": self._tokens(caption, rng),
                   "mask": np.bool_(True), "index": np.int32(index)}
        if self.missing_object_negatives:
            example["negative_image"] = images[1]
        if self.contrast_groups:
            negatives = self._negatives(caption, rng)
            slots = negatives + [caption] * (self.contrast_count - len(negatives))
            example["negative_text"] = np.stack([self._tokens(n, rng) for n in slots])
            example["negative_mask"] = np.arange(self.contrast_count) < len(negatives)
        return example

    @staticmethod
    def _removed(objects, rng: np.random.Generator) -> list:
        """The objects a negative image leaves out: one of the scene's removals, uniformly."""
        choices = synthetic_shapes.removals(objects)
        return choices[int(rng.integers(len(choices)))]

    def _negatives(self, caption: str, rng: np.random.Generator) -> list[str]:
        """Up to `contrast_count` different hard negatives of `caption` (a caption with few
        possible edits may yield fewer: drawing stops after a few repeats)."""
        found: list[str] = []
        for _ in range(4 * self.contrast_count):
            negative = contrast_caption(caption, self.contrast_groups, rng,
                                        self.contrast_excluded)
            if negative is None:
                break
            if negative not in found:
                found.append(negative)
                if len(found) == self.contrast_count:
                    break
        return found


def host_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"config.data.batch_size={global_batch} does not divide by the "
                         f"{process_count} processes")
    return global_batch // process_count


def make_loader(config, split: str, tokenizer: Tokenizer, *, training: bool,
                images: bool = True, process_index: int | None = None,
                process_count: int | None = None, source=None) -> grain.IterDataset:
    """This process's part of `split` as a Grain dataset of host-local batches (without
    'image' when not `images`).

    Training streams reshuffle every epoch, forever, and are one global stream for any number
    of processes: it is cut into host-sized pieces that the processes take in turn, so global
    batch k holds the same examples, augmented alike, whether one process or many read it, and
    every process's iterator stands at the same position (a checkpoint restores on another
    process count). Evaluation streams read a disjoint part of the split per process once, in
    order, with a smaller last batch (padded later, see `pad_batch`). Batches are formed
    before the worker processes split the work, so the stream is the same for any number of
    workers, and every example's random generator comes from (seed, position in the stream).
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    data = config.data
    if source is None:
        source = sources.data_source(sources.prepared_builder(data), split,
                                     decode_images=images)
    dataset = grain.MapDataset.source(source).map_with_index(WithPosition(len(source)))
    host_batch = host_batch_size(data.batch_size, process_count)
    prepare = PrepareExample(data, config.text, tokenizer, training, images)
    if training:
        if len(dataset) < data.batch_size:
            raise ValueError(f"split {split!r} has {len(dataset)} examples, fewer than "
                             f"config.data.batch_size={data.batch_size}")
        dataset = dataset.shuffle(seed=config.seed).repeat(None)
        dataset = dataset.random_map(prepare, seed=config.seed)
        dataset = dataset.batch(host_batch, drop_remainder=True)[process_index::process_count]
    else:
        # Every host takes the same number of records, hence of batches: a host that ran
        # out early would hang the others' collectives.
        usable = len(dataset) - len(dataset) % process_count
        dataset = dataset[:usable][process_index::process_count]
        if len(dataset) == 0:
            raise ValueError(f"split {split!r} has {len(source)} examples, too few for "
                             f"{process_count} processes")
        dataset = dataset.random_map(prepare, seed=config.seed).batch(host_batch)
    iterable = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=64))
    if data.workers > 0:
        if not flags.FLAGS.is_parsed():
            # Grain's worker processes read absl flags; outside an absl app (pytest, a
            # notebook) they were never parsed, so take the defaults.
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=data.workers))
    return iterable


class WithPosition(grain.transforms.MapWithIndex):
    """record -> (its position in the split, record). Grain numbers the elements of a
    repeated dataset on past its end, hence the modulo."""

    def __init__(self, count: int):
        self.count = count

    def map_with_index(self, index: int, record) -> tuple[int, dict]:
        return index % self.count, record


def evaluation_views(data_config, split: str, batch_size: int) -> Iterator[np.ndarray]:
    """Every image of `split` in order as its evaluation view (the centred square at
    `image_size`), in uint8 batches (b, S, S, 3), the last one shorter: what a token cache
    encodes once. Read by this process alone, whole."""
    source = sources.data_source(sources.prepared_builder(data_config), split)

    def view(record) -> np.ndarray:
        image = sources.as_rgb(sources.feature(record, data_config.image_key))
        return augment.center_view(image, data_config.image_size)

    dataset = grain.MapDataset.source(source).map(view).batch(batch_size)
    return iter(dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=data_config.read_threads,
                           prefetch_buffer_size=max(4, data_config.read_threads))))


def pad_batch(batch: dict, size: int) -> dict:
    """A short last evaluation batch filled up to `size` with masked-out zeros."""
    missing = size - len(batch["mask"])
    if missing == 0:
        return batch
    return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}


class GlobalBatches:
    """Iterates global, mesh-sharded batches, prefetched on a background thread.

    `get_state()` describes the position after the last batch *returned*, not after the ones
    waiting in the prefetch queue, so a checkpoint taken between steps resumes with exactly the
    batch the step after it would have seen. The state is JSON bytes, the form Grain's Orbax
    checkpoint handler (`training.checkpoint.DataCheckpointHandler`) stores per process.
    """

    def __init__(self, loader: grain.IterDataset, mesh: jax.sharding.Mesh, rules,
                 host_batch: int, prefetch: int = 2):
        self._loader = loader
        self._mesh = mesh
        self._rules = rules
        self._host_batch = host_batch
        self._prefetch = max(1, prefetch)
        self._iterator = iter(loader)
        self._state = self._iterator.get_state()  # Grain's state: a JSON-able dict.
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    @staticmethod
    def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
        """Waits for room in the queue unless asked to stop; False when stopped."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, q: queue.Queue, stop: threading.Event):
        try:
            for local in self._iterator:
                state = self._iterator.get_state()
                global_batch = logical.shard_batch(pad_batch(local, self._host_batch),
                                                   self._mesh, self._rules)
                if not self._put(q, stop, (global_batch, state)):
                    return
            self._put(q, stop, StopIteration())
        except BaseException as e:  # Surface input errors in the training thread.
            self._put(q, stop, e)

    def _start(self):
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                        daemon=True, name="global-batches")
        self._thread.start()

    def _stop_thread(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def close(self):
        """Stops prefetching and Grain's worker processes; the iterator is done after this."""
        self._stop_thread()
        self._iterator.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self.start_prefetch()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put(item)  # Later calls keep raising instead of blocking.
            raise item
        batch, self._state = item
        return batch

    def get_state(self) -> bytes:
        return json.dumps(self._state).encode()

    def set_state(self, state: bytes) -> None:
        """Repositions the stream; batches already prefetched are discarded."""
        self._stop_thread()
        self._state = json.loads(state)
        self._iterator.set_state(self._state)

    def start_prefetch(self) -> None:
        """Starts assembling batches ahead (Grain's checkpoint handler calls it on restore)."""
        if self._thread is None:
            self._start()


def global_batches(config, split: str, mesh: jax.sharding.Mesh, tokenizer: Tokenizer, *,
                   training: bool, images: bool = True) -> GlobalBatches:
    loader = make_loader(config, split, tokenizer, training=training, images=images)
    return GlobalBatches(loader, mesh, config.sharding.rules,
                         host_batch_size(config.data.batch_size, jax.process_count()),
                         prefetch=config.data.prefetch)


def measure_throughput(batches: Iterator, num_batches: int, warmup: int = 2) -> dict:
    """Examples per second over `num_batches` after `warmup` (start-up is not throughput)."""
    for _ in range(warmup):
        jax.block_until_ready(next(batches))
    start = time.perf_counter()
    examples = 0
    for _ in range(num_batches):
        batch = jax.block_until_ready(next(batches))
        examples += int(batch["mask"].shape[0])
    seconds = time.perf_counter() - start
    return {"batches": num_batches, "examples": examples, "seconds": seconds,
            "examples_per_second": examples / seconds}
