"""Reading XLA:CPU's per-operation trace events: time per operation, per kind, and what each is.

A script that uses this must turn the events on before XLA's CPU client starts:

    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_xprof_traceme=true"

then run the compiled program under `jax.profiler.trace(dir, create_perfetto_trace=True)`.
"""
import collections
import contextlib
import glob
import gzip
import json
import os
import re
import tempfile

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
# Trace events that are not XLA operations: Python frames, the executor, the dispatch.
NOT_OPERATIONS = ("$", "ThunkExecutor", "PjitFunction", "ParseArguments", "end: ",
                  "CommonPjRt", "SlinkyThreadPool")


def enable_operation_events() -> None:
    """Per-operation trace events; call before jax creates its CPU client."""
    flags = os.environ.get("XLA_FLAGS", "")
    if TRACEME_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {TRACEME_FLAG}".strip()


def operation_seconds(trace_dir: str) -> collections.Counter:
    """Seconds per XLA operation name, summed over the trace."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"),
                            recursive=True))[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not event["name"].startswith(NOT_OPERATIONS):
            seconds[event["name"]] += event.get("dur", 0) / 1e6
    return seconds


@contextlib.contextmanager
def traced_operations():
    """`with traced_operations() as seconds:` run programs; `seconds` is then filled with
    the seconds per XLA operation name of what ran inside."""
    import jax  # after the caller has set XLA_FLAGS

    seconds = collections.Counter()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            yield seconds
        seconds.update(operation_seconds(trace_dir))


def kind(name: str) -> str:
    """An operation's kind: its name without XLA's numbering ('ynn_fusion.12' -> 'ynn_fusion')."""
    return re.sub(r"\.\d+$", "", name)


def by_kind(seconds: collections.Counter) -> collections.Counter:
    kinds = collections.Counter()
    for name, s in seconds.items():
        kinds[kind(name)] += s
    return kinds


def describe(name: str, hlo: str) -> str:
    """Output shape, what the operation computes and where in the model it comes from."""
    line = re.search(rf"^\s*(?:ROOT )?%{re.escape(name)} = (\S+) .*$", hlo, re.M)
    if line is None:
        return ""
    text = line.group(0)
    source = re.search(r'op_name="([^"]*)"', text)
    what = ""
    called = re.search(r"calls=%([\w.\-]+)", text)
    if called:
        body = re.search(rf"^%{re.escape(called.group(1))} .*?^}}", hlo, re.M | re.S)
        if body:
            root = re.search(r"ROOT \S+ = \S+ (\w[\w-]*)\(", body.group(0))
            operands = re.findall(r"parameter\(\d+\)", body.group(0))
            shapes = re.findall(r"= (\S+) parameter\(", body.group(0))
            window = re.search(r"window=\{[^}]*\}", body.group(0))
            what = (f"{root.group(1) if root else '?'}"
                    f"{' ' + window.group(0) if window else ''} of "
                    f"{', '.join(s.split('{')[0] for s in shapes[:3])}"
                    f"{' …' if len(operands) > 3 else ''}")
    return (f"{line.group(1).split('{')[0]} | {what} | "
            f"{source.group(1)[-70:] if source else ''}")
