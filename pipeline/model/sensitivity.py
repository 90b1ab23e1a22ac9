"""Per-change sensitivities for the budget search: measured once (KL of each single change from the original
model) and turned into the additive estimate that ranks changes for the greedy plan.

A layer's groups share the layer's measured KL (all of them at their smallest format) in proportion to their
proxy errors, so a group's estimate at any format is its proxy times its layer's scale.
"""

from __future__ import annotations

import time
from typing import Callable

from ..artifacts import Sensitivities
from .structure import Structure
from .fitness import Evaluator, proxy_error
from .space import Candidate, Space


def measure(ev: Evaluator, space: Space, windows: int, moments: dict, name: str,
            progress=None) -> Sensitivities:
    """KL of every single change, on the first `windows` calibration windows, each from the unquantised model."""
    start, n = time.perf_counter(), space.info.num_layers
    full = Structure((True,) * n, (True,) * n)
    jobs = []
    if space.drop_attention:
        jobs += [("attention", i, Structure(_without(n, i), full.mlp)) for i in range(n)]
    if space.drop_mlp:
        jobs += [("mlp", i, Structure(full.attention, _without(n, i))) for i in range(n)]
    smallest = {g: space.levels[g][-1] for g in space.genes}
    for i in range(n):
        jobs.append(("layers", i, Structure(full.attention, full.mlp, {
            g: f for g, f in smallest.items() if g.startswith(f"layers.{i}.")})))
    jobs += [("table", f"{g}:{f.name}", Structure(full.attention, full.mlp, {g: f}))
             for g in space.genes if not g.startswith("layers.") for f in space.levels[g]]
    jobs += [("kv", kv, Structure(full.attention, full.mlp, {}, kv)) for kv in space.kv]
    found = {"attention": {}, "mlp": {}, "layers": {}, "table": {}, "kv": {}}
    for kind, index, structure in (progress(jobs, desc="sensitivities") if progress else jobs):
        found[kind][index] = max(ev.kl(structure, windows), 0.0)
    proxies = {g: {f.name: proxy_error(_weight(ev, g), moments[g], f) for f in space.levels[g]}
               for g in space.genes if g.startswith("layers.")}
    return Sensitivities(
        model=name, windows=windows, tokens=int(ev.windows[:windows].size),
        attention=tuple(found["attention"][i] for i in sorted(found["attention"])),
        mlp=tuple(found["mlp"][i] for i in sorted(found["mlp"])),
        layers=tuple(found["layers"][i] for i in range(n)), table=found["table"], kv=found["kv"], proxies=proxies,
        seconds=round(time.perf_counter() - start, 1))


def _without(n: int, i: int) -> tuple[bool, ...]:
    return tuple(j != i for j in range(n))


def _weight(ev: Evaluator, group: str):
    import numpy as np

    return np.concatenate([m.weight.detach().float().numpy() for _, m in ev.original[group]])


def additive_error(space: Space, sens: Sensitivities) -> Callable[[Candidate], float]:
    """Estimated KL of a candidate: the sum of its single changes' sensitivities."""
    n = space.info.num_layers
    scale = []
    for i in range(n):
        groups = [g for g in space.genes if g.startswith(f"layers.{i}.")]
        total = sum(sens.proxies[g][space.levels[g][-1].name] for g in groups)
        scale.append(sens.layers[i] / total if total > 0 else 0.0)
    per_level = []
    for g in space.genes:
        if g.startswith("layers."):
            s = scale[int(g.split(".")[1])]
            per_level.append([s * sens.proxies[g][f.name] for f in space.levels[g]])
        else:
            per_level.append([sens.table.get(f"{g}:{f.name}", 0.0) for f in space.levels[g]])
    kv = [sens.kv.get(k, 0.0) for k in space.kv]

    def error(c: Candidate) -> float:
        total = kv[c.kv] + sum(v for v, keep in zip(sens.attention, c.attention) if not keep)
        total += sum(v for v, keep in zip(sens.mlp, c.mlp) if not keep)
        kept = space._kept(c)
        return total + sum(levels[lv] for levels, lv, k in zip(per_level, c.levels, kept) if k)
    return error
