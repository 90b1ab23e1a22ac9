"""The budget search's space, in pure numbers: a candidate is which sublayers stay, a format level for every
linear group and for the table, and a KV precision; the space prices it with `costs`, checks it against the
limits, mutates it (EvoPress's level switch, then a repair that compresses until it fits and a fill that spends
what is left) and builds the greedy importance-ranked plan from per-change sensitivities.

Levels of a gene are ordered from the largest format to the smallest, so "compress" is one level up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..artifacts import ModelInfo
from .costs import Footprint, footprint
from .structure import TABLE, Format, Structure, all_groups, group_shape, merged_source, quant_format

LIMITS = ("max_file_mb", "max_memory_mb", "max_decode_ms")
FIGURE = {"max_file_mb": "file_mb", "max_memory_mb": "memory_mb", "max_decode_ms": "decode_ms"}
DROP_WEIGHT = 0.5  # a sublayer toggle is picked half as often as a format step: it moves cost and accuracy more


@dataclass(frozen=True)
class Candidate:
    attention: tuple[bool, ...]  # kept, per layer
    mlp: tuple[bool, ...]
    levels: tuple[int, ...]      # per format gene (Space.genes): index into Space.levels[gene]
    kv: int                      # index into Space.kv


Move = tuple[str, int, int]  # (what: attention, mlp, format or kv; index; +1 compresses, -1 relaxes)


def format_levels(info: ModelInfo, group: str, bits, block_sizes, grids, source: Format | None) -> tuple:
    """A group's formats, largest file bytes first: every (bits, block size, grid) of the quantiser's grids (offset
    grids only where the block size divides the input width) and the source's own blocks when reusable."""
    n, k = group_shape(info, group)
    formats = [quant_format(b, s, grid) for grid in grids for b in bits for s in block_sizes
               if grid != "offset" or k % s == 0]
    formats += [source] if source is not None else []

    def size(f: Format):
        return f.payload(n, k) + f.zero_point_bytes(n, k) + (2 * n * f.blocks(k) if f.offsets else 0)
    return tuple(sorted(set(formats), key=lambda f: (-size(f), f.name)))


class Space:
    """Genes, their levels and the cost of any candidate (memoised)."""

    def __init__(self, info: ModelInfo, levels: dict[str, tuple[Format, ...]], kv: tuple[str, ...],
                 drop_attention: bool, drop_mlp: bool, context: int, calibration=None):
        self.info, self.levels, self.kv, self.context, self.calibration = info, levels, kv, context, calibration
        self.genes = [g for g in all_groups(info) if g in levels]
        self.drop_attention, self.drop_mlp = drop_attention, drop_mlp
        self._costs: dict[tuple, Footprint] = {}

    # ---------------------------------------------------------------- candidates and costs

    def key(self, c: Candidate) -> tuple:
        """What the model is: the levels of dropped sublayers' groups do not count."""
        kept = self._kept(c)
        return c.attention, c.mlp, tuple(lv if keep else -1 for lv, keep in zip(c.levels, kept)), c.kv

    def _kept(self, c: Candidate) -> list[bool]:
        s = Structure(c.attention, c.mlp)
        return [s.keeps(g) for g in self.genes]

    def structure(self, c: Candidate) -> Structure:
        formats = {g: self.levels[g][lv] for g, lv, keep in zip(self.genes, c.levels, self._kept(c)) if keep}
        return Structure(c.attention, c.mlp, formats, self.kv[c.kv])

    def candidate(self, s: Structure) -> Candidate | None:
        """The candidate of a structure, or None when one of its formats is not a level of this space."""
        levels = []
        for g in self.genes:
            fmt = s.formats.get(g) if s.keeps(g) else self.levels[g][0]
            if fmt not in self.levels[g]:
                return None
            levels.append(self.levels[g].index(fmt))
        if s.kv_dtype not in self.kv:
            return None
        return Candidate(s.attention, s.mlp, tuple(levels), self.kv.index(s.kv_dtype))

    def footprint(self, c: Candidate) -> Footprint:
        key = self.key(c)
        if key not in self._costs:
            self._costs[key] = footprint(self.info, self.structure(c), self.context, self.calibration)
        return self._costs[key]

    def most_accurate(self) -> Candidate:
        n = self.info.num_layers
        return Candidate((True,) * n, (True,) * n, (0,) * len(self.genes), 0)

    def smallest(self) -> Candidate:
        """The smallest reachable model: one attention (and MLP) sublayer left where drops are allowed, every
        gene at its smallest format, the smallest KV precision."""
        n = self.info.num_layers
        attention = (True,) + (False,) * (n - 1) if self.drop_attention else (True,) * n
        mlp = (True,) + (False,) * (n - 1) if self.drop_mlp else (True,) * n
        return Candidate(attention, mlp, tuple(len(self.levels[g]) - 1 for g in self.genes), len(self.kv) - 1)

    def describe(self, c: Candidate) -> str:
        return describe(self.info, self.structure(c))

    # ---------------------------------------------------------------- limits

    def violation(self, c: Candidate, limits: dict[str, float]) -> float:
        """Sum over the limits of the relative excess (0: fits)."""
        fp = self.footprint(c)
        return sum(max(0.0, getattr(fp, FIGURE[k]) / v - 1) for k, v in limits.items())

    def fits(self, c: Candidate, limits: dict[str, float]) -> bool:
        return self.violation(c, limits) == 0

    def binding(self, c: Candidate, limits: dict[str, float], slack: float = 0.02) -> list[str]:
        """The limits the candidate is within `slack` of."""
        fp = self.footprint(c)
        return [k for k, v in limits.items() if getattr(fp, FIGURE[k]) >= v * (1 - slack)]

    # ---------------------------------------------------------------- moves

    def moves(self, c: Candidate, direction: int) -> list[Move]:
        """Every one-level step that compresses (+1) or relaxes (-1) the candidate and keeps one attention and
        one MLP sublayer."""
        out = []
        for what, kept, allowed in (("attention", c.attention, self.drop_attention), ("mlp", c.mlp, self.drop_mlp)):
            if allowed:
                out += [(what, i, direction) for i, k in enumerate(kept)
                        if k == (direction > 0) and (direction < 0 or sum(kept) > 1)]
        for j, (g, lv, keep) in enumerate(zip(self.genes, c.levels, self._kept(c))):
            if keep and 0 <= lv + direction < len(self.levels[g]):
                out.append(("format", j, direction))
        if 0 <= c.kv + direction < len(self.kv):
            out.append(("kv", 0, direction))
        return out

    @staticmethod
    def apply(c: Candidate, move: Move) -> Candidate:
        what, i, d = move
        if what in ("attention", "mlp"):
            kept = list(getattr(c, what))
            kept[i] = d < 0
            return replace(c, **{what: tuple(kept)})
        if what == "format":
            levels = list(c.levels)
            levels[i] += d
            return replace(c, levels=tuple(levels))
        return replace(c, kv=c.kv + d)

    def _pick(self, moves: list[Move], rng: np.random.Generator) -> Move:
        weights = np.array([DROP_WEIGHT if m[0] in ("attention", "mlp") else 1.0 for m in moves])
        return moves[rng.choice(len(moves), p=weights / weights.sum())]

    def mutate(self, c: Candidate, rng: np.random.Generator, limits: dict[str, float], fill: int = 3) -> Candidate:
        """Level switch (one gene a level up, another a level down, once or a few times), then repair
        (random compressing steps until the limits hold) and fill (a few random relaxing steps kept only when
        the limits still hold)."""
        child = c
        for _ in range(1 + rng.binomial(2, 0.3)):
            for direction in (-1, 1):
                options = self.moves(child, direction)
                if options:
                    child = self.apply(child, self._pick(options, rng))
        while not self.fits(child, limits):
            options = self.moves(child, 1)
            if not options:
                return c
            child = self.apply(child, self._pick(options, rng))
        for _ in range(fill):
            options = self.moves(child, -1)
            if options:
                relaxed = self.apply(child, self._pick(options, rng))
                child = relaxed if self.fits(relaxed, limits) else child
        return child

    def greedy(self, start: Candidate, limits: dict[str, float], error: Callable[[Candidate], float]) -> Candidate:
        """The importance-ranked plan: from `start`, take the compressing step with the most limit violation
        removed per unit of estimated error until the limits hold, then the relaxing steps that still fit, the
        most error removed first. `error` is the additive sensitivity estimate of a candidate."""
        c = start
        while not self.fits(c, limits):
            here, err = self.violation(c, limits), error(c)
            steps = []
            for m in self.moves(c, 1):
                n = self.apply(c, m)
                steps.append((here - self.violation(n, limits), error(n) - err, n))
            if not steps:
                return c
            relieving = [(relief / max(cost, 1e-12), n) for relief, cost, n in steps if relief > 0]
            # a step that relieves nothing can open one that does (the next level of a gene may cost what this
            # one does, as a source format does next to its own kind); every step compresses, so this ends
            c = max(relieving, key=lambda o: o[0])[1] if relieving else max(steps, key=lambda o: (o[0], -o[1]))[2]
        while True:
            err = error(c)
            options = [(error(n), n) for m in self.moves(c, -1) if self.fits(n := self.apply(c, m), limits)]
            options = [(e, n) for e, n in options if e < err]
            if not options:
                return c
            c = min(options, key=lambda o: o[0])[1]


def describe(info: ModelInfo, s: Structure) -> str:
    """One line: what is dropped, how many groups take each format, the table's, the KV precision."""
    n, body = info.num_layers, {}
    for g in s.groups(info):
        if g not in (TABLE, "lm_head"):
            name = s.formats[g].name if s.formats.get(g) else "fp32"
            body[name] = body.get(name, 0) + 1
    table = s.formats.get(TABLE)
    return (f"{n - sum(s.attention)} of {n} attention and {n - sum(s.mlp)} of {n} MLP sublayers dropped; "
            f"groups {', '.join(f'{v} {k}' for k, v in sorted(body.items()))}; table "
            f"{table.name if table else 'fp32'}; KV {s.kv_dtype}")


def build_space(info: ModelInfo, search, source: dict[str, Format | None], context: int,
                calibration=None) -> Space:
    """The space a recipe's `budget.search` spans for this model; `source` maps groups to their GGUF format."""
    levels = {}
    for g in all_groups(info):
        bits = search.table_bits if g in (TABLE, "lm_head") else search.bits
        levels[g] = format_levels(info, g, bits, search.block_sizes, search.grids,
                                  source.get(g) if search.source_blocks else None)
    kv = tuple(sorted(search.kv_precisions, key=("fp32", "fp16").index))
    return Space(info, levels, kv, search.drop_attention, search.drop_mlp, context, calibration)


def source_formats(info: ModelInfo, types: dict[str, str]) -> dict[str, Format | None]:
    """Group -> the format its source GGUF blocks would have (None where they cannot be reused); `types` maps
    parameter paths to GGUF tensor types."""
    from .structure import group_params

    return {g: merged_source([types.get(p, "") for p in group_params(info, g)]) for g in all_groups(info)}
