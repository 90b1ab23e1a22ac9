"""The reference rung picker for a model ladder (ladder.json): which model an app loads at launch, and which it
falls back to when memory turns out short.

Self-contained on purpose (standard library only): copy this file into an app's tooling, or port its dozen lines.
A rung fits when its measured peak memory, moved to the app's context length, plus a safety margin is at most
the memory the device can give; rungs are tried from most to least capable. docs/budget.md describes the schema.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def memory_at(rung: dict, ladder: dict, context: int | None = None) -> float:
    """A rung's peak memory (MiB) at `context` tokens: measured at the ladder's context, plus (or minus) the KV
    cache of the difference times the measured cost of a KV MiB."""
    if context is None or context == ladder["context"]:
        return rung["memory_mb"]
    factor = rung.get("kv_factor") or 3.0  # the runner holds two to three copies of the cache at its peak
    return rung["memory_mb"] + (context - ladder["context"]) * rung["kv_kb_per_token"] / 1024 * factor


def fitting(ladder: dict, free_mb: float, context: int | None = None, margin_mb: float = 0.0) -> list[dict]:
    """The rungs that fit `free_mb`, most capable first: the first is the one to load, the rest its fallbacks.
    A dominated rung (another is as accurate, small and fast at every context) is never one of them."""
    return [r for r in ladder["rungs"]
            if not r.get("dominated_by") and memory_at(r, ladder, context) + margin_mb <= free_mb]


def pick(ladder: dict, free_mb: float, context: int | None = None, margin_mb: float = 0.0,
         failed: tuple[str, ...] = ()) -> dict | None:
    """The most capable rung that fits and has not already failed to load (`failed`: rung names); None when no
    rung fits, which the app should report rather than load anything."""
    return next((r for r in fitting(ladder, free_mb, context, margin_mb) if r["name"] not in failed), None)


def load_ladder(path: str | Path) -> dict:
    ladder = json.loads(Path(path).read_text())
    if not isinstance(ladder.get("rungs"), list) or "context" not in ladder:
        raise ValueError(f"{path} is not a ladder.json (no rungs list or context)")
    return ladder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Pick a rung of a model ladder for the memory a device can give.")
    p.add_argument("ladder", help="ladder.json written by a budget ladder run")
    p.add_argument("--free-mb", type=float, required=True, help="memory the app may use, MiB")
    p.add_argument("--context", type=int, default=None, help="tokens the app will keep (default: the ladder's)")
    p.add_argument("--margin-mb", type=float, default=0.0, help="headroom to leave, MiB")
    args = p.parse_args(argv)
    ladder = load_ladder(args.ladder)
    rung = pick(ladder, args.free_mb, args.context, args.margin_mb)
    if rung is None:
        print(f"no rung fits {args.free_mb:g} MiB; the smallest needs "
              f"{min(memory_at(r, ladder, args.context) for r in ladder['rungs']):.0f} MiB", file=sys.stderr)
        return 1
    print(json.dumps({"name": rung["name"], "files": rung["files"],
                      "memory_mb": round(memory_at(rung, ladder, args.context), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
