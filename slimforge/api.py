"""The Python API: each stage as a function over model folders, and evaluation.

Every function here goes the recipe's way: it composes a one-stage recipe from the
shipped preset of the method (``recipes/<kind>/<method>.yaml``, exactly what
``prune@stages.prune: wanda`` brings into a recipe), applies the keyword arguments on
top, validates it with the same schemas and ``check()`` methods, and runs it through
:mod:`slimforge.pipeline` into a run directory. So the artifact is the one the CLI
would make from the same settings, with the same ``slimforge.json``, model card,
manifest, skip-if-done and resume; and a mistake raises the CLI's one-line
:class:`~slimforge.errors.ConfigError` before any model loads.

``slimforge.evaluate`` is ``slimforge eval``: same arguments, same engine, same report.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimforge.errors import ConfigError

PathLike = str | Path
STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Arguments every stage function takes besides the method's own options.
RUN_KEYS = ("data", "name", "seed", "device", "dtype", "overwrite")


# --- building a one-stage recipe ---------------------------------------------------------


def _model_spec(model: PathLike, what: str) -> dict[str, Any]:
    """``teacher`` section for a folder, .gguf file, hub id or embedded model asset name."""
    from slimforge.assets import ASSETS

    text = str(model)
    if not text:
        raise ConfigError(f"{what}: give a model folder, .gguf file, hub id or model asset name")
    local = Path(text).expanduser()
    if not local.exists() and text in ASSETS and ASSETS[text].kind == "model":
        return {"asset": text}
    return {"path": str(local.resolve()) if local.exists() else text}


def _data_spec(data: PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """``data`` section: a path, a data asset name, or a mapping of DataConfig fields."""
    from slimforge.assets import is_data_asset

    if data is None:
        return {"asset": "shakespeare"}
    if isinstance(data, Mapping):
        spec = dict(data)
        local = Path(str(spec.get("path") or "")).expanduser()
        if spec.get("path") and local.exists():
            spec["path"] = str(local.resolve())
        return spec
    text = str(data)
    local = Path(text).expanduser()
    if not local.exists() and is_data_asset(text):
        return {"asset": text}
    return {"path": str(local.resolve()) if local.exists() else text}


def _check_options(kind: str, method: str, options: Mapping[str, Any]) -> None:
    """Unknown option names fail here, naming the method's options (types and ranges: in validation)."""
    from slimforge.registry import registry

    schema = registry(kind).get(method).load_schema()
    known = [f.name for f in dataclasses.fields(schema) if f.name not in ("kind", "method")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown option(s) {', '.join(unknown)} for {kind} method {method!r}.{hint} "
                          f"Its options: {', '.join(known)}")


def _plain(value: Any) -> Any:
    """Paths and tuples as OmegaConf takes them."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def stage_recipe(kind: str, method: str, name: str, teacher: dict[str, Any], data: dict[str, Any],
                 options: Mapping[str, Any], run: Mapping[str, Any]) -> Any:
    """A validated one-stage :class:`~slimforge.config.Recipe`, composed like a recipe file.

    The stage starts from the method's shipped preset when there is one (its defaults are
    the ones a recipe gets), then takes ``options``; ``run`` sets top-level keys
    (seed, device, dtype, run_dir, overwrite).
    """
    from omegaconf import open_dict
    from omegaconf.errors import OmegaConfBaseException

    from slimforge.config import validate_recipe
    from slimforge.recipes import compose_recipe, recipes_dir
    from slimforge.registry import registry

    if not STAGE_NAME.match(name):
        raise ConfigError(f"stage name {name!r} is invalid: use letters, digits and underscores")
    registry(kind).get(method)  # an unknown kind or method fails here, listing the valid ones
    _check_options(kind, method, options)
    preset = (recipes_dir() / kind / f"{method}.yaml").is_file()
    lines = ["defaults:", "  - slimforge_recipe"]
    lines += [f"  - {kind}@stages.{name}: {method}"] if preset else []
    lines += ["  - _self_", f"name: {name}", f"pipeline: [{name}]"]
    if not preset:
        lines += ["stages:", f"  {name}: {{kind: {kind}, method: {method}}}"]
    with tempfile.TemporaryDirectory(prefix="slimforge-api-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        cfg = compose_recipe(str(path), [])
    patch = {"teacher": teacher, "data": data, "stages": {name: _plain(dict(options))},
             **{k: _plain(v) for k, v in run.items()}}
    try:
        with open_dict(cfg):
            cfg.merge_with(patch)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        raise ConfigError(f"invalid config at {key or 'recipe'}: {str(err).splitlines()[0]}") from None
    return validate_recipe(cfg)


def run_stage(kind: str, model: PathLike, out_dir: PathLike | None = None, *, method: str,
              teacher: PathLike | None = None, data: PathLike | Mapping[str, Any] | None = None,
              name: str | None = None, seed: int = 0, device: str = "auto", dtype: str = "auto",
              overwrite: bool = False, **options: Any) -> Path:
    """Run one stage of ``kind`` on ``model`` into the run directory ``out_dir``; returns the artifact folder.

    Args:
        kind: ``prune``, ``distill``, ``quantize`` or ``student``.
        model: the stage's input: a model folder (a slimforge artifact or any HF folder), a
            ``.gguf`` file, a hub id, or ``smollm2-135m`` (the embedded model).
        out_dir: the run directory (``manifest.json``, ``run.log``, ``stages/<name>/``);
            default ``runs/<name>/<timestamp>``. Calling again with the same settings
            reuses the finished artifact; other settings are refused unless ``overwrite``.
        method: a registered method of ``kind`` (``slimforge recipes`` / docs list them).
        teacher: the teacher, when it is not ``model`` itself (distillation).
        data: text for calibration and training: a file or folder, a data asset name
            (default ``shakespeare``), or a mapping of ``data`` fields
            (``{"path": ..., "block_size": 128}``).
        name: the stage's name (its folder under ``stages/``); default: ``kind``.
        seed, device, dtype, overwrite: as the recipe keys of the same names.
        **options: the method's config fields (``sparsity=0.5``, ``steps=200``, ``bits=4``...).

    Raises:
        ConfigError: an unknown method or option, a value out of range, a missing file.
    """
    from slimforge.pipeline import run_one
    from slimforge.rundir import resolve_run_dir

    name = name or kind
    if teacher is not None and str(teacher) == str(model):
        teacher = None
    run: dict[str, Any] = {"seed": seed, "device": device, "dtype": dtype, "overwrite": overwrite}
    if out_dir is not None:
        run["run_dir"] = str(Path(out_dir).expanduser().resolve())
    recipe = stage_recipe(kind, method, name, _model_spec(teacher if teacher is not None else model, "teacher"),
                          _data_spec(data), options, run)
    source = None
    if teacher is not None:
        from slimforge.models import resolve_model

        local = Path(str(model)).expanduser()
        source = resolve_model(str(local.resolve()) if local.exists() else str(model),
                               "student" if kind == "distill" else "input", code_setting=None)
    result = run_one(recipe, resolve_run_dir(recipe.config), source)
    return result.artifacts[name]


def prune(model: PathLike, out_dir: PathLike | None = None, *, method: str = "wanda",
          data: PathLike | Mapping[str, Any] | None = None, name: str = "prune", seed: int = 0,
          device: str = "auto", dtype: str = "auto", overwrite: bool = False, **options: Any) -> Path:
    """Prune ``model``: ``magnitude``, ``wanda``, ``sparsegpt`` (unstructured or N:M), ``depth``, ``width``.

    Options are the method's config fields, e.g. ``sparsity=0.5``, ``n=2, m=4``,
    ``num_samples=64`` (calibration), ``remove_ratio=0.25`` (depth), ``param_ratio=0.6`` (width).
    Returns the pruned model's folder, ``<out_dir>/stages/<name>``. See :func:`run_stage`.

    Example::

        pruned = slimforge.prune("smollm2-135m", "runs/api/prune", method="wanda", sparsity=0.5)
    """
    return run_stage("prune", model, out_dir, method=method, data=data, name=name, seed=seed, device=device,
                     dtype=dtype, overwrite=overwrite, **options)


def distill(student: PathLike, teacher: PathLike, out_dir: PathLike | None = None, *, method: str = "kd",
            data: PathLike | Mapping[str, Any] | None = None, name: str = "distill", seed: int = 0,
            device: str = "auto", dtype: str = "auto", overwrite: bool = False, **options: Any) -> Path:
    """Distill ``teacher`` into ``student`` (a folder that shares the teacher's tokenizer).

    Options are the ``kd`` config fields: ``steps``, ``batch_size``, ``lr``, ``loss``,
    ``temperature``, ``keep_sparsity``, ``lora={"enabled": True}``, ``teacher_cache``...
    ``data`` is what it trains on. Returns the distilled model's folder. See :func:`run_stage`.
    """
    return run_stage("distill", student, out_dir, method=method, teacher=teacher, data=data, name=name,
                     seed=seed, device=device, dtype=dtype, overwrite=overwrite, **options)


def quantize(model: PathLike, out_dir: PathLike | None = None, *, method: str = "bnb_nf4",
             data: PathLike | Mapping[str, Any] | None = None, name: str = "quantize", seed: int = 0,
             device: str = "auto", dtype: str = "auto", overwrite: bool = False, **options: Any) -> Path:
    """Quantize ``model``: ``bnb_int8``, ``bnb_nf4``, ``bnb_fp4``, ``rtn``, ``gptq`` or ``gguf``.

    Options are the method's config fields, e.g. ``bits=4, group_size=64`` (rtn, gptq),
    ``type="Q4_0"`` (gguf), ``double_quant=True`` (bnb). ``data`` is read by GPTQ's
    calibration only. Returns the quantized model's folder (a GGUF artifact's file is
    named in its ``slimforge.json``). See :func:`run_stage`.
    """
    return run_stage("quantize", model, out_dir, method=method, data=data, name=name, seed=seed, device=device,
                     dtype=dtype, overwrite=overwrite, **options)


# --- evaluation --------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What :func:`evaluate` hands back: the report and where it was written."""

    out_dir: Path
    report: dict[str, Any]

    @property
    def retained(self) -> dict[str, dict[str, float]]:
        """Per student: ``task.metric`` -> student / teacher (teacher / student where lower is better)."""
        return self.report.get("retained", {})

    @property
    def passed(self) -> bool:
        """Whether the gate passed (True when it had nothing to check)."""
        return self.exit_code == 0

    @property
    def exit_code(self) -> int:
        """What ``slimforge eval`` would exit with: 0 pass, 1 a student missed a threshold, 2 a threshold
        named a task with no signal (the teacher at chance)."""
        from slimforge.eval.gate import exit_code

        return exit_code(self.report)


def _min_retained(value: Any) -> list[str]:
    """``--min-retained`` items from a number, a mapping ``{task: x}`` or the CLI's strings."""
    if value is None:
        return []
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [repr(float(value))]
    if isinstance(value, Mapping):
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | Path):
        return [str(value)]
    return [str(v) for v in value]


def evaluate(teacher: PathLike, students: PathLike | Sequence[PathLike],
             tasks: str | Sequence[str] = ("perplexity", "word_perplexity", "efficiency"), *,
             labels: Sequence[str] | None = None, out_dir: PathLike | None = None, data: str = "shakespeare",
             block_size: int = 256, max_blocks: int = 64, limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 8, seed: int = 1234, device: str = "auto", dtype: str = "auto",
             include_path: Sequence[PathLike] = (), allow_code: bool = False, generation: Sequence[PathLike] = (),
             max_new_tokens: int | None = None, stop: Sequence[str] = (),
             min_retained: float | Mapping[str, float] | Sequence[str] | None = None,
             max_kl: float | None = None, min_top1: float | None = None, max_bias_shift: float | None = None,
             cache: bool = True, write_cards: bool = False) -> EvalResult:
    """Evaluate a teacher and its students alike, as ``slimforge eval`` does.

    Arguments mirror the command's flags (``--max-blocks`` is ``max_blocks``); tasks are
    ``perplexity``, ``word_perplexity``, ``efficiency``, lm-eval task names (``arc_easy``,
    ``arc_easy:50`` for 50 items, ``offline`` for all shipped benchmarks, ``bias``); ``generation`` takes
    jsonl files or shipped generation set names (``xsum``), ``max_new_tokens`` None keeps each set's cap
    (64 for a file). ``min_retained``
    takes a number (every task) or ``{"arc_easy": 0.9}``; ``max_bias_shift`` bounds each student's
    overall bias shift from the teacher (needs ``bias``). ``allow_code`` lets the task YAMLs under
    ``include_path`` run Python (off: refused; only for tasks you trust). ``write_cards`` adds the results
    to each student's model card when the student is a slimforge artifact.

    Returns:
        An :class:`EvalResult`: ``report`` (``report.json``'s content), ``out_dir`` (where
        ``eval/``, ``report.md`` and ``report.html`` are), ``retained``, ``passed``.
    """
    from slimforge.config import DEVICES, DTYPES, check_choice
    from slimforge.eval.command import evaluate as evaluate_namespace

    for key, value, choices in (("device", device, DEVICES), ("dtype", dtype, DTYPES)):
        check_choice(key, value, choices)
    ns = argparse.Namespace(
        teacher=str(teacher), students=_as_list(students), labels=list(labels) if labels else None,
        tasks=_as_list(tasks), generation=_as_list(generation), max_new_tokens=max_new_tokens, stop=list(stop),
        limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, device=device, dtype=dtype, seed=seed,
        data=str(data), block_size=block_size, max_blocks=max_blocks, include_path=_as_list(include_path),
        allow_code=allow_code, min_retained=_min_retained(min_retained), max_kl=max_kl, min_top1=min_top1,
        max_bias_shift=max_bias_shift,
        out=str(out_dir) if out_dir is not None else None, no_cache=not cache, write_cards=write_cards)
    if not ns.students:
        raise ConfigError("evaluate: give at least one student")
    report, folder = evaluate_namespace(ns)
    return EvalResult(folder, report)


__all__ = ["EvalResult", "distill", "evaluate", "prune", "quantize", "run_stage"]
