"""The console: stage lines, progress bars and real problems on the terminal; library noise in a log file.

`capture(log)` points file descriptors 1 and 2 at the log file for the duration, so exporter warnings, ONNX
Runtime's C++ messages and child processes' output land there, and keeps a duplicate of the terminal that
`say`, `stage` and `progress` write to. `--verbose` (or SLIMFORMER_VERBOSE=1) leaves the terminal alone.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

_terminal = None  # the terminal while output is captured; None: write to sys.stderr
VERBOSE_ENV = "SLIMFORMER_VERBOSE"


def stream():
    return _terminal or sys.stderr


def say(message: str) -> None:
    print(message, file=stream(), flush=True)


def progress(iterable=None, **kwargs):
    """A tqdm bar on the terminal (never in the log), cleared when done; off when the terminal is no tty."""
    from tqdm import tqdm

    kwargs.setdefault("disable", None)  # None: tqdm turns itself off on a non-tty stream
    return tqdm(iterable, file=stream(), leave=False, dynamic_ncols=True, **kwargs)


@contextmanager
def stage(index: int, total: int, name: str, timings: dict | None = None):
    """`[i/n] name ...` then `[i/n] name done in s`; the seconds are also added to `timings[name]` (a stage run
    once per source model counts its total)."""
    say(f"[{index}/{total}] {name} ...")
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    if timings is not None:
        timings[name] = round(timings.get(name, 0.0) + seconds, 2)
    say(f"[{index}/{total}] {name} done in {seconds:.1f} s")


def skipped(index: int, total: int, name: str, why: str) -> None:
    say(f"[{index}/{total}] {name}: skipped ({why})")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


@contextmanager
def capture(log: Path):
    """Send everything written to stdout/stderr (this process and its children) to `log` until the block ends;
    the console keeps writing to the terminal. Nested or verbose: a no-op."""
    global _terminal
    if _terminal is not None or verbose():
        yield
        return
    for s in (sys.stdout, sys.stderr):
        s.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8", errors="replace") as sink:
        _terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        logging.captureWarnings(True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("default")  # every library warning once, in the log
                yield
        finally:
            for s in (sys.stdout, sys.stderr):
                s.flush()
            logging.captureWarnings(False)
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            _terminal.close()
            _terminal = None
