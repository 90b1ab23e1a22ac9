"""What the bench commands share: where their library output goes, and how their JSON is written."""

from __future__ import annotations

import json
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from .. import console
from ..config.paths import home


@contextmanager
def bench_log(name: str, out: str | None):
    """Library output of a bench into `<out>.log` (beside its JSON), else home()/logs/<name>-<time>.log."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log = Path(out).with_suffix(".log") if out else home() / "logs" / f"{name}-{stamp}.log"
    console.say(f"{name}: library output goes to {log}")
    with console.capture(log):
        yield log


def write_json(out: str | None, data: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(data, indent=2))


def pct(value: float, base: float) -> str:
    return f"{100 * (value / base - 1):+.1f} %"
