"""How the commands set up the host process that the compiled programs run in.

XLA:CPU takes every temporary of a compiled program (one block for the program's whole buffer
assignment: about 100 MB for the main job's CLIP step) from malloc when the program starts and
frees it when it ends. glibc's malloc serves blocks that large with a fresh mmap and returns
them with munmap, so every step's temporaries came back from the kernel as new 4 KiB pages,
each zeroed and faulted in on first touch: the main job spent about a quarter of its CPU time
in the kernel (16 million page faults in 600 CLIP steps). With glibc's
`glibc.malloc.hugetlb=1` tunable, malloc asks for transparent huge pages for such blocks
(madvise), 2 MiB at a time: the same 600 steps fault 24 times less, and each takes about 18%
less time. Keeping the blocks instead (one arena, no mmap) removed the faults too but cost more
user time than it saved, as every thread then shares one arena.

Tunables are read when a process starts, so `use_huge_pages` starts the command again, once,
with the tunable set (`cli.run` calls it first). `DALLE_JAX_HUGE_PAGES=0` leaves the process
as it is.
"""
from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
# The first glibc with the tunable; older ones ignore it, so the restart would gain nothing.
GLIBC_WITH_TUNABLE = (2, 35)


def glibc_version() -> tuple[int, ...] | None:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        return None  # not glibc (macOS, musl)
    return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else None


def wants_restart(environ=os.environ) -> bool:
    """Whether this process should start again with huge pages: on glibc that has the
    tunable, unless it is set already (by the restart itself, or by the user) or turned off."""
    if environ.get("DALLE_JAX_HUGE_PAGES", "1") == "0":
        return False
    if TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return False
    version = glibc_version()
    return version is not None and version >= GLIBC_WITH_TUNABLE


def environment_with_huge_pages(environ=os.environ) -> dict[str, str]:
    tunables = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return dict(environ, GLIBC_TUNABLES=":".join(tunables + [f"{TUNABLE}=1"]))


def use_huge_pages() -> None:
    """Starts the running command again in this process (same PID, arguments and open files)
    with glibc's malloc using transparent huge pages for large blocks; returns at once when
    there is nothing to do (see `wants_restart`). Call it before any work: the command's
    imports run again."""
    if not wants_restart():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment_with_huge_pages())
