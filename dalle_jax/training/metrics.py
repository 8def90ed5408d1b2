"""Where a run reports: a JSON-lines file, TensorBoard event files and PNG image grids.

Only process 0 writes, so a pod's hosts do not write the same files N times. The workdir may be
a bucket (see `dalle_jax.files`): objects cannot be appended to, so there metrics.jsonl is
rewritten whole at each record (a few hundred bytes per logged step), and TensorBoard, whose
writer only writes local files, writes to a local mirror copied into the workdir every
`SYNC_SECONDS` and at the end.
"""
from __future__ import annotations

import json
import time
from typing import Mapping

import jax
import numpy as np

from dalle_jax import files

SYNC_SECONDS = 60.0


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self._tensorboard = None
        self._mirror = None
        self._jsonl = files.join(workdir, "metrics.jsonl")
        self._lines: list[str] = []
        self._synced = time.monotonic()
        if self.enabled:
            from flax.metrics import tensorboard  # Imports TensorFlow: only where it writes.

            files.make_dirs(files.join(workdir, "images"))
            self._mirror = files.LocalMirror(files.join(workdir, "tensorboard"))
            self._tensorboard = tensorboard.SummaryWriter(self._mirror.path)
            if files.is_remote(workdir) and files.exists(self._jsonl):
                self._lines = files.read_text(self._jsonl).splitlines(keepends=True)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}{k}": float(v) for k, v in values.items()}
        for key, value in values.items():
            self._tensorboard.scalar(key, value, step)
        self._append(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        if time.monotonic() - self._synced > SYNC_SECONDS:
            self.flush()

    def _append(self, line: str) -> None:
        if files.is_remote(self._jsonl):
            self._lines.append(line)
            files.write_text(self._jsonl, "".join(self._lines))
        else:
            with files.path(self._jsonl).open("a") as f:
                f.write(line)

    def image(self, step: int, name: str, grid: np.ndarray) -> str | None:
        """Writes a uint8 (H, W, 3) grid to TensorBoard and images/<name>_<step>.png."""
        if not self.enabled:
            return None
        grid = np.asarray(grid, dtype=np.uint8)
        self._tensorboard.image(name, grid, step)
        path = files.join(self.workdir, "images", f"{name}_{step:08d}.png")
        files.write_png(path, grid)
        return path

    def flush(self) -> None:
        if self.enabled:
            self._tensorboard.flush()
            self._mirror.sync()
            self._synced = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._mirror.close()


def read_metrics(workdir: str) -> list[dict]:
    """Every record of a run's metrics.jsonl (for tests, notebooks and reports)."""
    text = files.read_text(files.join(workdir, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines() if line.strip()]
