"""Typed artifacts passed between stages and written into the run folder.

Each is a frozen dataclass with a schema version and `to_json`/`from_json`, so a later stage (or a
later run) can read what an earlier one wrote. The run folder itself is managed by `pipeline.run`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

SCHEMA_VERSION = 1


class _Artifact:
    filename: str = ""

    def to_json(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict):
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(f"{cls.__name__}: schema_version {version} is not {SCHEMA_VERSION}")
        names = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names})

    def write(self, folder: Path) -> Path:
        path = Path(folder) / self.filename
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path):
        return cls.from_json(json.loads((Path(folder) / cls.filename).read_text()))


@dataclass(frozen=True)
class Scores(_Artifact):
    """Importance of every sublayer and block: mean of 1 - cos(X, Y) over calibration tokens."""

    model: str
    metric: str
    tokens: int
    attention: tuple[float, ...]
    mlp: tuple[float, ...]
    block: tuple[float, ...]
    filename = "scores.json"

    @property
    def num_layers(self) -> int:
        return len(self.block)


@dataclass(frozen=True)
class DropPlan(_Artifact):
    """Which sublayers to remove (original layer indices), and why."""

    method: str
    attention: tuple[int, ...]
    mlp: tuple[int, ...]
    num_layers: int
    order: tuple[tuple[str, int, float], ...] = field(default=())  # (kind, layer, score), in drop order
    filename = "plan.json"

    @classmethod
    def from_json(cls, data: dict):
        plan = super().from_json(data)
        return cls(plan.method, plan.attention, plan.mlp, plan.num_layers,
                   tuple(tuple(x) for x in plan.order))

    @property
    def kept_attention(self) -> int:
        return self.num_layers - len(self.attention)
