"""lm-evaluation-harness integration: task lookup, in-memory models, per-item results.

A model already in memory (plain, pruned, bitsandbytes, LoRA, dequantized
GGUF) is wrapped in lm-eval's ``HFLM`` with the run's batch size, whose
log-likelihoods read each distinct context once (:mod:`slimforge.eval.shared_context`:
the same values, ~2x fewer tokens on multiple choice); tasks come
from a ``TaskManager`` over the shipped offline YAMLs (``recipes/tasks/``) and
the user's include paths. lm-eval's own index of ~14k built-in tasks takes ~11 s
to build, so it is consulted only when a name is not found in those folders.

Limits are deterministic: instead of lm-eval's "first N documents" (which on
HellaSwag or MMLU is a handful of topics), a fixed random subset of N documents
per task is drawn with the eval seed and passed as lm-eval's ``samples``.

Each result records the task's chance level: what a model that guesses scores on its
accuracy metrics (:func:`chance_level`), against which the report decides whether the
teacher's score carries any signal.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import math
import random
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimforge.errors import ConfigError
from slimforge.eval.offline import shipped_tasks_dir
from slimforge.eval.stats import ItemScores

log = logging.getLogger(__name__)

# lm-eval's result keys that are not metrics.
_NOT_METRICS = {"name", "alias", "sample_len", "samples"}
# Aggregations whose per-item values slimforge can rebuild (and so bootstrap).
_LN2 = math.log(2)
# What a result holds beyond lm-eval's numbers; part of the task's cache key (2: the chance level).
RESULT_FORMAT = 2
# Metrics that score the answer ranked first (or the greedy continuation) right or wrong: a model
# that guesses scores the chance level on these, and on no other metric.
CHANCE_METRICS = ("acc", "acc_norm", "acc_bytes")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence lm-eval's and datasets' chatter (per-task warnings, progress bars) for a call."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


@functools.lru_cache(maxsize=8)
def _task_manager(include_paths: tuple[str, ...], include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    with quiet_libraries():
        return TaskManager(include_path=list(include_paths), include_defaults=include_defaults)


def task_manager(names: list[str], include_path: list[str] | tuple[str, ...] = (), allow_code: bool = False) -> Any:
    """A TaskManager that knows every name in ``names``.

    Args:
        names: lm-eval task, group or tag names.
        include_path: folders of task YAMLs beside the shipped ones.
        allow_code: let those YAMLs run Python (``!function`` and the like); off, they are refused.

    Raises:
        ConfigError: a name is unknown even to lm-eval's built-in index (with near matches), or
            an include path's YAML would run code that is not allowed.
    """
    from slimforge.eval.taskcode import refuse_task_code

    paths = [str(shipped_tasks_dir())]
    for folder in include_path:
        if not Path(folder).expanduser().is_dir():
            raise ConfigError(f"eval include path {folder} is not a folder; give a folder of lm-eval task YAMLs")
        paths.append(str(Path(folder).expanduser().resolve()))
    if not allow_code:
        refuse_task_code(include_path)
    manager = _task_manager(tuple(paths), False)
    local = set(manager.all_tasks)
    missing = [name for name in names if name not in local]
    if not missing:
        return manager
    builtin = builtin_task_names()
    unknown = [name for name in missing if name not in builtin]
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(local | builtin), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list them with `lm-eval ls tasks`"
        raise ConfigError(f"unknown lm-eval task {unknown[0]!r}{hint}")
    log.info("indexing lm-eval's built-in tasks for %s (~10 s)", ", ".join(missing))
    return _task_manager(tuple(paths), True)


def builtin_task_names() -> set[str]:
    """Names of lm-eval's built-in tasks, groups and tags, indexed once per lm-eval version.

    Building lm-eval's index takes ~10 s; keeping its names in the slimforge
    cache makes a mistyped task name fail at once on later runs.
    """
    from importlib.metadata import version

    from slimforge.assets import cache_root
    from slimforge.fsutil import atomic_write_json, read_json

    path = cache_root() / "eval" / f"lm-eval-{version('lm_eval')}-tasks.json"
    if path.is_file():
        return set(read_json(path))
    log.info("indexing lm-eval's built-in tasks once (~10 s)")
    names = sorted(_task_manager((), True).all_tasks)
    atomic_write_json(path, names)
    return set(names)


def uses_offline_data(manager: Any, name: str) -> bool:
    """True when ``name`` (a task, group or tag) is one of the shipped offline tasks."""
    entry = manager.task_index.get(name)
    shipped = shipped_tasks_dir().resolve()
    if entry is None:
        return False
    if entry.yaml_path is not None:
        return shipped in Path(entry.yaml_path).resolve().parents
    return any(uses_offline_data(manager, member) for member in entry.tags)


def check_task_data(names: list[str], include_path: list[str] | tuple[str, ...] = (), allow_code: bool = False) -> None:
    """Fail early, in one line, when a name is unknown, a task would run code that is not
    allowed, or its offline data is not fetched."""
    from slimforge.eval.offline import data_root

    manager = task_manager(names, include_path, allow_code)
    if any(uses_offline_data(manager, name) for name in names):
        data_root()


def subset_indices(num_docs: int, limit: int | None, seed: int, task_name: str) -> list[int] | None:
    """A fixed random subset of ``limit`` document indices (sorted), or None for all.

    The stream depends on the seed and the task's name only, so the subset of a
    task does not change with the other tasks evaluated beside it.
    """
    if limit is None or limit >= num_docs:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(task_name.encode())])
    return sorted(int(i) for i in rng.choice(num_docs, size=limit, replace=False))


def load_tasks(manager: Any, specs: list[Any], num_fewshot: int | None, seed: int) -> dict[str, Any]:
    """Build lm-eval tasks, with lm-eval's own few-shot rules and the eval seed."""
    with quiet_libraries():
        loaded = manager.load(specs)
    for task in loaded["tasks"].values():
        # As lm_eval.simple_evaluate does: an explicit 0 in the YAML is kept, None means 0.
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)
    return loaded


def run_loaded(model: Any, tokenizer: Any, loaded: dict[str, Any], batch_size: int, limit: int | None,
               seed: int) -> dict[str, Any]:
    """Evaluate built tasks on an in-memory model; returns lm-eval's results with samples."""
    import torch
    from lm_eval.evaluator import evaluate

    from slimforge.eval.shared_context import shared_context_lm

    samples = {}
    for name, task in loaded["tasks"].items():
        indices = subset_indices(len(task.eval_docs), limit, seed, name)
        if indices is not None:
            samples[name] = indices
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with quiet_libraries():
        lm = shared_context_lm(model, tokenizer, batch_size)
        return evaluate(lm, loaded, samples=samples or None, bootstrap_iters=0, log_samples=True)


# --- lm-eval results -> slimforge results ------------------------------------------------


def _metric_values(results: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in results.items():
        metric, _, filt = key.partition(",")
        if metric in _NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        out[metric if filt in ("", "none") else f"{metric}_{filt}"] = float(value)
    return out


def _item_scores(values: list[Any], aggregation: str) -> ItemScores | None:
    """Per-item values in slimforge's form for one lm-eval aggregation, or None if unsupported."""
    if aggregation == "mean":
        return ItemScores([float(v) for v in values])
    if aggregation == "perplexity":  # per-item log-likelihoods; exp(-mean)
        return ItemScores([-float(v) for v in values], None, "exp")
    if aggregation in ("weighted_perplexity", "bits_per_byte"):  # (log-likelihood, units) pairs
        units = [float(w) for _, w in values]
        per_unit = [-float(ll) / w for (ll, _), w in zip(values, units)]
        if aggregation == "bits_per_byte":
            return ItemScores([v / _LN2 for v in per_unit], units)
        return ItemScores(per_unit, units, "exp")
    return None


def _choice(sample: dict[str, Any]) -> int | None:
    """The answer index the model ranks first by raw log-likelihood (multiple choice only)."""
    resps = sample.get("filtered_resps")
    if not resps or not all(isinstance(r, list | tuple) and r and isinstance(r[0], float) for r in resps):
        return None
    lls = [r[0] for r in resps]
    return int(max(range(len(lls)), key=lls.__getitem__))


@dataclass(frozen=True)
class ItemChance:
    """What guessing scores on one item.

    Attributes:
        chance: expected accuracy of a uniform random pick (right answers / choices); 0 for an
            open continuation.
        gold: the index of the one right answer, where the target names a single one.
        options: the answer options as scored (empty when the item is not multiple choice).
    """

    chance: float
    gold: int | None = None
    options: tuple[str, ...] = ()


def _gold_indices(target: Any, options: list[str]) -> list[int] | None:
    """The indices of an item's right answers, from lm-eval's target (an index, indices or the text)."""
    if isinstance(target, int) and not isinstance(target, bool):
        return [target]
    if isinstance(target, list) and target and all(isinstance(t, int) and not isinstance(t, bool) for t in target):
        return sorted(set(target))
    if isinstance(target, str):
        hits = [i for i, option in enumerate(options) if option.strip() == target.strip()]
        return hits if len(hits) == 1 else None
    return None


def item_chance(output_type: str | None, sample: dict[str, Any]) -> ItemChance | None:
    """What guessing scores on one logged lm-eval sample; None when the task type has no chance level.

    A multiple-choice item asks one log-likelihood per option (twice as many with
    ``acc_mutual_info``, whose second half is the unconditional pass). A ``loglikelihood``
    item is right only when the greedy continuation is the target: chance is 0.
    """
    if output_type == "loglikelihood":
        return ItemChance(0.0)
    if output_type != "multiple_choice":
        return None
    args = list(sample.get("arguments") or [])
    if "acc_mutual_info" in sample.get("metrics", []) and len(args) % 2 == 0:
        args = args[: len(args) // 2]
    if not args:
        return None
    options = [str(arg[1]) for arg in args]
    gold = _gold_indices(sample.get("target"), options)
    if gold and not all(0 <= i < len(options) for i in gold):  # lm-eval scores such an item wrong anyway
        gold = None
    right = len(gold) if gold else 1
    return ItemChance(min(1.0, right / len(options)), gold[0] if gold and len(gold) == 1 else None, tuple(options))


def chance_level(items: list[ItemChance]) -> tuple[float, str]:
    """A task's chance level over its evaluated items, and how it was found.

    The mean of the items' uniform-guess chance (1 / choices); but where every item
    offers the same options (yes / no, true / false), always answering the most frequent
    right answer scores its share of the items, and that is the level to beat when it is
    higher (unbalanced labels).
    """
    uniform = sum(item.chance for item in items) / len(items)
    if not any(item.options for item in items):
        return 0.0, "an open continuation: a guess essentially never matches the target"
    option_sets = {item.options for item in items}
    golds = [item.gold for item in items]
    if len(option_sets) == 1 and all(g is not None for g in golds):
        gold, count = Counter(golds).most_common(1)[0]
        if count / len(items) > uniform:
            option = next(iter(option_sets))[gold].strip()
            return count / len(items), f"majority answer {option!r} ({count} of {len(items)} items)"
    sizes = {len(item.options) for item in items}
    if len(sizes) == 1 and all(item.chance == 1 / len(item.options) for item in items):
        return uniform, f"1 / {sizes.pop()} choices"
    return uniform, "mean over items of right answers / choices"


def _task_chance(items: list[ItemChance | None]) -> tuple[float, str] | None:
    """The chance level when every item has one and they are of one kind (no mix of open and multiple choice)."""
    if not items or any(item is None for item in items):
        return None
    known = [item for item in items if item is not None]
    if len({bool(item.options) for item in known}) > 1:
        return None
    return chance_level(known)


def harness_result(name: str, loaded: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """One slimforge task result from lm-eval's output for ``name`` (a task, group or tag).

    Returns:
        Headline metrics (floats); ``per_item`` (metric -> ItemScores JSON);
        ``item_ids`` (``<task>/<doc_id>``); ``choices`` (answer ranked first,
        multiple choice only); ``higher_is_better``; ``items``; ``subtasks``; for a
        multiple-choice or ``loglikelihood`` task, ``chance`` (what guessing scores),
        ``chance_basis`` (how it was found) and ``chance_metrics`` (the metrics it applies to).
    """
    leaves = sorted(loaded["tasks"])
    higher: dict[str, bool] = {}
    aggregations: dict[str, str] = {}
    for leaf in leaves:
        task = loaded["tasks"][leaf]
        higher.update(task.higher_is_better())
        aggregations.update({m: getattr(fn, "__name__", str(fn)) for m, fn in task.aggregation().items()})
    ids: list[str] = []
    raw: dict[str, list[Any]] = {m: [] for m in aggregations}
    choices: list[int | None] = []
    chances: list[ItemChance | None] = []
    for leaf in leaves:
        output_type = getattr(loaded["tasks"][leaf], "OUTPUT_TYPE", None)
        for sample in sorted(out["samples"].get(leaf, []), key=lambda s: s["doc_id"]):
            ids.append(f"{leaf}/{sample['doc_id']}")
            choices.append(_choice(sample))
            chances.append(item_chance(output_type, sample))
            for metric in raw:
                raw[metric].append(sample.get(metric))
    per_item = {}
    for metric, values in raw.items():
        if values and all(v is not None for v in values):
            scores = _item_scores(values, aggregations[metric])
            if scores is not None:
                per_item[metric] = scores
    headline = _metric_values(out["results"].get(name, {}))
    if not headline:  # a tag, or a group without aggregate metrics: the mean over all items
        from slimforge.eval.stats import aggregate

        headline = {m: float(aggregate(np.asarray(s.values), None if s.weights is None else np.asarray(s.weights),
                                       s.transform)) for m, s in per_item.items()}
    result: dict[str, Any] = dict(headline)
    result.update({
        "items": len(ids),
        "per_item": {m: s.to_json() for m, s in per_item.items()},
        "item_ids": ids,
        "higher_is_better": {m: bool(higher.get(m, True)) for m in headline},
        "subtasks": leaves,
    })
    if choices and all(c is not None for c in choices):
        result["choices"] = choices
    chance = _task_chance(chances)
    metrics = [m for m in CHANCE_METRICS if m in headline and m in per_item]
    if chance is not None and metrics:
        result.update({"chance": chance[0], "chance_basis": chance[1], "chance_metrics": metrics})
    return result


def default_metric(result: dict[str, Any]) -> str | None:
    """The metric that gates and plots: ``acc_norm`` where present, else the first headline metric."""
    metrics = [m for m in result.get("higher_is_better", {})]
    if "acc_norm" in metrics:
        return "acc_norm"
    return metrics[0] if metrics else None


# --- the task type -----------------------------------------------------------------------


def harness_task(model: Any, tokenizer: Any, cfg: Any, ctx: Any) -> dict[str, Any]:
    """Registered as ``lm_eval``: one lm-eval task, group or tag on an in-memory model."""
    from jinja2.exceptions import SecurityError

    from slimforge.eval.taskcode import ALLOW_CODE_HINT, sandboxed_templates

    allow_code = bool(getattr(ctx, "allow_code", False))
    manager = task_manager([cfg.task], getattr(ctx, "include_path", ()), allow_code)
    try:
        with sandboxed_templates(enabled=not allow_code):
            loaded = load_tasks(manager, [cfg.task], cfg.num_fewshot, ctx.seed)
            reported = sorted({m for task in loaded["tasks"].values() for m in task.higher_is_better()})
            if cfg.metric is not None and cfg.metric not in reported:
                raise ConfigError(f"lm-eval task {cfg.task!r} has no metric {cfg.metric!r}; "
                                  f"it reports {', '.join(reported)}")
            out = run_loaded(model, tokenizer, loaded, ctx.batch_size, cfg.limit, ctx.seed)
    except SecurityError as err:
        raise ConfigError(f"lm-eval task {cfg.task!r}: a prompt template reaches Python internals ({err}); "
                          f"templates may do that only when you allow code ({ALLOW_CODE_HINT})") from None
    result = harness_result(cfg.task, loaded, out)
    result["metric"] = cfg.metric or default_metric(result)
    result["num_fewshot"] = {leaf: loaded["tasks"][leaf].get_config("num_fewshot") for leaf in result["subtasks"]}
    return result
