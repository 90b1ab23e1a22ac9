"""Evolutionary search in the manner of EvoPress (Sieberling et al., arXiv 2410.14649): a (1 + lambda) loop whose
children come from level-switch mutations of the parent, chosen by multi-step selection on growing token counts.

Each generation mutates `offspring` children; the first selection step scores every child on a few calibration
windows and keeps the best few, the next scores those on more windows, ...; the last step's winner replaces the
parent when it is better on the same windows. Pure: the candidates, their mutation and their fitness (lower is
better, e.g. KL divergence from the original model) come in as callables, and a seeded generator makes a run
reproducible. Every score is memoised by candidate and window count.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np


@dataclass
class SearchLog:
    """Every fitness computed: key -> {windows: fitness}, and the parent after each generation."""

    scores: dict[Hashable, dict[int, float]] = field(default_factory=dict)
    candidates: dict[Hashable, object] = field(default_factory=dict)
    parents: list[Hashable] = field(default_factory=list)
    generations: int = 0
    seconds: float = 0.0

    def score(self, cands: list, windows: int, fitness: Callable, key: Callable) -> list[float]:
        """The candidates' fitness on `windows` windows, computing only what is not logged yet."""
        todo = [c for c in {key(c): c for c in cands}.values() if windows not in self.scores.get(key(c), {})]
        for c, value in zip(todo, fitness(todo, windows) if todo else []):
            self.candidates[key(c)] = c
            self.scores.setdefault(key(c), {})[windows] = float(value)
        return [self.scores[key(c)][windows] for c in cands]


def evolve(parent, mutate: Callable, fitness: Callable, key: Callable, steps: list[tuple[int, int]],
           generations: int, offspring: int, rng: np.random.Generator, max_seconds: float | None = None,
           log: SearchLog | None = None, progress=None, enough: float | None = None):
    """(best candidate, log). `mutate(candidate, rng)` returns a child; `fitness(candidates, windows)` returns
    their fitness on the first `windows` calibration windows; `key(candidate)` says which candidates are the
    same model; `steps` are (windows, keep) pairs, the last keeping 1. A shared `log` carries scores over
    from earlier searches (a ladder's rungs). The search stops early once the parent's fitness is at most
    `enough` (a KL that small is the original model for every measurable purpose)."""
    log = log or SearchLog()
    start = time.perf_counter()

    def scored(cands: list, windows: int) -> list[float]:
        return log.score(cands, windows, fitness, key)

    last = steps[-1][0]
    parent_fit = scored([parent], last)[0]
    for generation in range(generations):
        if enough is not None and parent_fit <= enough:
            break
        children = _distinct_children(parent, mutate, key, offspring, rng)
        for windows, keep in steps:
            if not children:
                break
            values = scored(children, windows)
            order = np.argsort(values, kind="stable")[:keep]
            children = [children[i] for i in order]
        if children and scored(children, last)[0] < parent_fit:
            parent, parent_fit = children[0], scored(children, last)[0]
        log.parents.append(key(parent))
        log.generations += 1
        if progress is not None:
            progress(generation, parent_fit)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break
    log.seconds += time.perf_counter() - start
    return parent, log


def _distinct_children(parent, mutate: Callable, key: Callable, n: int, rng: np.random.Generator) -> list:
    """Up to `n` mutated children, none equal to the parent or to each other (a few tries per child)."""
    seen, children = {key(parent)}, []
    for _ in range(4 * n):
        child = mutate(parent, rng)
        if key(child) not in seen:
            seen.add(key(child))
            children.append(child)
            if len(children) == n:
                break
    return children
