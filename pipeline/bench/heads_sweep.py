"""`make bench-heads`: held-out perplexity and accuracy vs KV groups removed, against attention sublayer drops
that remove the same KV bytes.

One head-analysis pass and one sublayer-scoring pass; at each count n, the n least important KV groups (head
importance), n groups drawn at random (seeded: what the ranking is worth), and, where n is a multiple of the KV
heads per layer, the n / kv least important attention sublayers; all measured in PyTorch on the same held-out data.
"""

from __future__ import annotations

import dataclasses
import random

from .. import console
from ..artifacts import HeadPlan, HeadScores
from ..config.recipe import DropSpec, Recipe
from ..measure.torch_lm import torch_accuracy
from ..measure.validate import prepare_eval_data
from ..stages import analyse_heads, drop, plan, plan_heads, prepare, score
from .common import bench_log, pct, write_json


def heads_sweep(recipe: Recipe, counts: list[int], seed: int = 0, out: str | None = None) -> list[dict]:
    with bench_log("heads-sweep", out):
        p = prepare(recipe)
        model, tokenizer, name = p.loaded.model, p.loaded.tokenizer, p.loaded.description
        scores, heads = score(model, tokenizer, recipe.calibration, name), analyse_heads(model, tokenizer, recipe, name)
        data = prepare_eval_data(tokenizer, recipe.validate_)
        none = plan(scores, DropSpec())
        rows = [_row("none", 0, model, data, kv_heads=sum(map(len, heads.group_importance)))]
        _say(rows[0], rows[0])
        kv = len(heads.group_importance[0])
        for n in counts:
            first = len(rows)
            ranked = plan_heads(heads, DropSpec(heads=n), none)
            rows.append(_row("heads", n, drop(model, none, tokenizer, head_plan=ranked), data, ranked))
            drawn = random_plan(heads, n, seed)
            rows.append(_row("heads, random", n, drop(model, none, tokenizer, head_plan=drawn), data, drawn))
            if n % kv == 0:
                sublayers = plan(scores, DropSpec(attention=n // kv))
                row = _row("attention", n, drop(model, sublayers, tokenizer), data, kv_heads=rows[0]["kv_heads"] - n)
                rows.append({**row, "attention_dropped": list(sublayers.attention)})
            for row in rows[first:]:
                _say(row, rows[0])
    write_json(out, {"model": name, "head_scores": heads.to_json(), "rows": rows, "seed": seed,
                     "settings": recipe.validate_.model_dump(mode="json")})
    print(markdown_table(rows))
    return rows


def random_plan(heads: HeadScores, n: int, seed: int) -> HeadPlan:
    """n KV groups drawn uniformly (seeded) among those a ranked plan could take: each layer keeps one."""
    from ..model.plan import plan_heads as plan_

    rng = random.Random(seed)
    drawn = plan_(dataclasses.replace(heads, group_importance=tuple(
        tuple(rng.random() for _ in layer) for layer in heads.group_importance)), heads=n)
    return HeadPlan(method="global", kv_groups=drawn.kv_groups, query_heads={}, kv_heads=drawn.kv_heads,
                    order=tuple((layer, g, heads.group_importance[layer][g]) for layer, g, _ in drawn.order))


def _row(variant: str, n: int, model, data, head_plan: HeadPlan | None = None, kv_heads: int | None = None) -> dict:
    acc = torch_accuracy(model, data)
    row = {"variant": variant, "kv_groups_removed": n, "perplexity": acc.perplexity, "mc_accuracy": acc.mc_accuracy,
           "kv_heads": sum(head_plan.kv_heads) if head_plan else kv_heads}
    if head_plan is not None:
        row["groups"] = [f"{layer}.{g}" for layer, gs in head_plan.kv_groups.items() for g in gs]
    return row


def _say(row: dict, base: dict) -> None:
    console.say(f"{row['variant']:>14} {row['kv_groups_removed']:>3}  ppl {row['perplexity']:8.3f} "
                f"({pct(row['perplexity'], base['perplexity']):>8})  mc {row['mc_accuracy']:.3f}")


def markdown_table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| removed | KV groups | KV heads kept | perplexity | vs unpruned | MC accuracy | which |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        which = ", ".join(r.get("groups", [])) or ", ".join(f"layer {i}" for i in r.get("attention_dropped", []))
        lines.append(f"| {r['variant']} | {r['kv_groups_removed']} | {r['kv_heads']} | {r['perplexity']:.3f} | "
                     f"{pct(r['perplexity'], base['perplexity'])} | {r['mc_accuracy']:.3f} | {which} |")
    return "\n".join(lines)
