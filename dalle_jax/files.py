"""Files in a workdir, local or in a bucket: every read and write goes through `etils.epath`.

`epath.Path` is what Orbax and Grain use too, so `--workdir gs://bucket/run` works the same as
a local directory, without a mount. Object stores differ from a disk in two ways that matter
here, and the helpers below cover both:

- an object is written whole when its writer closes, and cannot be appended to or renamed
  cheaply: a remote file is written in one piece (which is atomic), a local one to a temporary
  name and then renamed over the target (which is atomic there);
- libraries that only write local files (TensorBoard's summary writer, the profiler) write to
  a local directory that is copied into the workdir (`LocalMirror`).
"""
from __future__ import annotations

import io
import os
import posixpath
import shutil
import socket
import tempfile

import numpy as np
from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """A URL (gs://, s3://, ...) rather than a path on this machine."""
    return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
    """`path` absolute and normalised ('..' resolved), as a string; URLs keep their scheme."""
    path = os.fspath(path)
    if is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.abspath(path)


def join(*parts: PathLike) -> str:
    """The parts joined with '/', as a string (`join('gs://b/run', 'config.json')`)."""
    return os.fspath(epath.Path(*parts))


def relative(path: str, start: str) -> str:
    """`path` relative to `start` (both absolute, on the same file system)."""
    if is_remote(path):
        return posixpath.relpath(path.split("://", 1)[1], start.split("://", 1)[1])
    return os.path.relpath(path, start)


def inside(path: str, root: str) -> bool:
    """Whether absolute `path` is `root` or lies below it."""
    if is_remote(path) != is_remote(root):
        return False
    return path == root or path.startswith(root.rstrip("/") + "/")


class NotWritable(OSError):
    """A workdir the project cannot write into, or one without room for a checkpoint."""


def check_writable(directory: PathLike) -> None:
    """Makes `directory` (and its parents) and writes, then removes, a small file in it, so a
    read-only or misplaced workdir fails before any work rather than at the first save."""
    # Named per host and process: a pod's hosts probe the same bucket at once.
    probe = join(directory, f".write-test-{socket.gethostname()}-{os.getpid()}")
    try:
        make_dirs(directory)
        write_text(probe, "ok")
        epath.Path(probe).unlink()
    except OSError as e:
        raise NotWritable(f"workdir {os.fspath(directory)!r} is not writable "
                          f"({type(e).__name__}: {e.strerror or e})") from None


def free_bytes(directory: PathLike) -> int | None:
    """Free bytes on the file system of local `directory`; None for a bucket (no such limit)."""
    if is_remote(directory):
        return None
    return shutil.disk_usage(os.fspath(directory)).free


def path(path: PathLike) -> epath.Path:
    return epath.Path(path)


def exists(path: PathLike) -> bool:
    return epath.Path(path).exists()


def is_file(path: PathLike) -> bool:
    return epath.Path(path).is_file()


def make_dirs(path: PathLike) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def read_text(path: PathLike) -> str:
    return epath.Path(path).read_text()


def read_bytes(path: PathLike) -> bytes:
    return epath.Path(path).read_bytes()


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` so that readers see the old file or the new one, never a part."""
    path = epath.Path(path)
    if is_remote(path):
        path.write_bytes(data)  # an object appears whole when its upload completes
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image  # noqa: PLC0415 (PIL only where images are written)

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path: PathLike, pixels: np.ndarray) -> None:
    """A uint8 (H, W, 3) image as a PNG file."""
    write_bytes(path, png_bytes(pixels))


def copy_tree(source: PathLike, target: PathLike) -> None:
    """Copies every file below local directory `source` to the same place below `target`."""
    for directory, _, names in os.walk(source):
        below = os.path.relpath(directory, source)
        destination = epath.Path(target) if below == "." else epath.Path(target) / below
        destination.mkdir(parents=True, exist_ok=True)
        for name in names:
            (destination / name).write_bytes(epath.Path(directory, name).read_bytes())


class LocalMirror:
    """A local directory for a writer that only writes local files, mirrored into `target`.

    For a local `target` it is `target` itself. For a remote one it is a temporary directory
    whose files `sync()` copies into `target` (whole files: writers append, objects do not).
    """

    def __init__(self, target: PathLike):
        self.target = os.fspath(target)
        self.remote = is_remote(self.target)
        if self.remote:
            self.path = tempfile.mkdtemp(prefix="dalle_jax-")
        else:
            make_dirs(self.target)
            self.path = self.target

    def sync(self) -> None:
        if self.remote:
            copy_tree(self.path, self.target)

    def close(self) -> None:
        if self.remote:
            self.sync()
            shutil.rmtree(self.path, ignore_errors=True)
