"""Runs a recipe: stage order, skip-if-done, resume, then the evaluation, recorded in the manifest.

Each run writes into one run directory (:mod:`slimforge.rundir`: its layout, manifest and lock).
A stage's *fingerprint* hashes its kind, method and config with its parent's
fingerprint (and the data's, where it uses data). Re-running into the same
directory skips every stage whose fingerprint and artifact are unchanged, redoes
an interrupted one (its artifact only appears, by rename, once complete), and
refuses to replace a finished artifact made from a different config unless
``overwrite=true``. An artifact is reused only while its files still match the
sha256 digests recorded in its ``checksums.json`` when it was published; a
damaged one is made again, with a warning.

A bug inside a stage or an evaluation ends
the run with one line naming ``run.log`` (which holds the traceback); the
finished work stays, and the same command resumes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import slimforge.dist as dist
from slimforge._version import __version__
from slimforge.config import Recipe, hashed_config, validate_recipe
from slimforge.errors import ConfigError, RunDirError
from slimforge.fsutil import (
    CHECKSUMS_FILE,
    atomic_dir,
    atomic_write_json,
    atomic_write_text,
    checksum_problem,
    ensure_writable_dir,
    read_json,
    read_json_or_none,
    stable_hash,
    write_checksums,
)
from slimforge.models import META_FILE, RECIPE_FILE, ModelRef
from slimforge.recipes import compose_recipe, compose_run, expand_sweep
from slimforge.rundir import (
    MANIFEST,
    RUN_LOG,
    SWEEP_FILE,
    Manifest,
    StageRecord,
    check_run_dir,
    check_sweep_dir,
    now,
    resolve_run_dir,
    run_lock,
    run_logging,
)
from slimforge.session import Session, resolve_teacher
from slimforge.stage import StageContext, StageOutput, TeacherInfo

log = logging.getLogger("slimforge")

DATA_KINDS = ("prune", "distill", "quantize")
# Stage kinds that run on every rank under `accelerate launch`; the rest run on the main rank.
TRAINING_KINDS = ("distill",)


def config_hash(obj: Any) -> str:
    """Hash of a dataclass (its fields but those declared ``NOT_HASHED``) or mapping, independent of key order."""
    return stable_hash(hashed_config(obj) if hasattr(obj, "__dataclass_fields__") else obj)


# --- what preflight checks see -----------------------------------------------------------


def model_info(ref: ModelRef, tokenizer: Any = None, load: Any = None) -> TeacherInfo:
    """A model's config and tokenizer, for preflight checks; a GGUF file is loaded (``load``) for its config."""
    if ref.gguf_file or ref.path.endswith(".gguf"):
        config = (load() if load is not None else ref.load()[0]).config
    else:
        config = ref.load_config()
    return TeacherInfo(config=config, tokenizer=tokenizer if tokenizer is not None else ref.load_tokenizer())


def teacher_info(session: Session) -> TeacherInfo:
    """The session's teacher for preflight checks: its tokenizer, and its config without the weights."""
    return model_info(session.teacher_ref, session.teacher_tokenizer(), lambda: session.teacher()[0])


def data_record(bundle: Any) -> dict[str, Any]:
    """What an artifact records about the data that made it: the fingerprint, the source, and for
    teacher-generated text the generation (key, settings, samples kept and dropped, tokens)."""
    record = {"fingerprint": bundle.fingerprint, "source": bundle.stats.get("source")}
    if bundle.stats.get("generation"):
        record["generation"] = bundle.stats["generation"]
    return record


# --- the run -----------------------------------------------------------------------------


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name a recipe's ``dtype`` takes."""
    return str(dtype).removeprefix("torch.")


def _other_dtype(meta: dict[str, Any], stage: PlannedStage) -> bool:
    """Whether a finished artifact was made in another dtype than this run's. Artifacts from before
    slimforge recorded it have none, and count as this run's (as they always did)."""
    made = meta.get("dtype")
    return bool(made and stage.dtype and made != stage.dtype)


@dataclass
class PlannedStage:
    index: int
    name: str
    config: Any
    entry: Any
    fingerprint: str
    config_hash: str
    parent: ModelRef | None  # None until the previous stage has an artifact
    parent_fingerprint: str
    dtype: str = ""  # the run's resolved dtype: an artifact made in another is neither reused nor replaced unasked


@dataclass
class RunResult:
    """What a finished run hands back (also what ``slimforge.run`` returns)."""

    run_dir: Path
    manifest: dict[str, Any]
    report: dict[str, Any]

    @property
    def artifacts(self) -> dict[str, Path]:
        return {name: Path(rec["artifact"]) for name, rec in self.manifest.get("stages", {}).items()
                if rec.get("artifact")}


def artifact_damage(folder: Path) -> str | None:
    """What in a finished artifact no longer matches its ``checksums.json``, or None.

    An artifact published before slimforge recorded checksums gets them now, from the
    files as they are: from then on, a change is noticed.
    """
    if not (folder / CHECKSUMS_FILE).exists():
        log.info("recording the checksums of %s (made before slimforge recorded them)", folder)
        write_checksums(folder)
        return None
    return checksum_problem(folder)


class Run:
    """One invocation of one recipe into one run directory.

    The first stage's input is the teacher, unless ``source`` names another model (the
    Python API's ``slimforge.distill(student, teacher=...)``); the teacher then joins
    every fingerprint, since the stages still learn from it.
    """

    def __init__(self, recipe: Recipe, run_dir: Path, source: ModelRef | None = None) -> None:
        from omegaconf import OmegaConf

        self.recipe = recipe
        self.cfg = recipe.config
        self.run_dir = run_dir
        self.source = source
        self.recipe_yaml = OmegaConf.to_yaml(recipe.raw)
        self.manifest = Manifest(run_dir / MANIFEST)

    # -- planning (cheap, before any model loads) --

    def plan(self, session: Session) -> list[PlannedStage]:
        """Fingerprint every stage and run each method's preflight checks."""
        from slimforge.eval.runner import check_eval_models

        check_eval_models(self.recipe)  # names only: before the data is built
        info = source_info = None
        data_fp = None
        planned: list[PlannedStage] = []
        if self.recipe.tasks or any(self.recipe.stages[n].kind in DATA_KINDS for n in self.recipe.pipeline):
            session.data()  # empty or broken data fails here, before any stage runs
        if self.recipe.tasks:
            from slimforge.eval.runner import preflight_run

            preflight_run(self.recipe, session)  # task names and data, gate targets: before any stage
        first = self.source or session.teacher_ref
        parent_fp = first.fingerprint
        known: TeacherInfo | None = None  # the next stage's input, where planned_config tells it
        for index, name in enumerate(self.recipe.pipeline):
            stage_cfg = self.recipe.stages[name]
            from slimforge.registry import registry

            entry = registry(stage_cfg.kind).get(stage_cfg.method)
            # check_teacher: checks against the teacher alone, valid at any position;
            # preflight: checks against the stage's input when it is the first stage's;
            # check_input: the same for a later stage, when the stages before it say what they make
            # (planned_config: the config of a stage's output, e.g. a width prune's stated sizes).
            hooks = [h for h in ("check_teacher", "preflight" if index == 0 else "check_input", "planned_config")
                     if hasattr(stage_cfg, h)]
            planned_input, known = known, None
            for hook in hooks:
                if hook == "check_teacher":
                    target = info = info or teacher_info(session)
                elif index > 0:
                    target = planned_input
                elif self.source is not None:
                    target = source_info = source_info or model_info(self.source)
                else:
                    target = info = info or teacher_info(session)
                if target is None:
                    continue
                try:
                    result = getattr(stage_cfg, hook)(target)
                except ConfigError as err:
                    from slimforge.config import FieldError

                    raise (err.at(f"stages.{name}") if isinstance(err, FieldError) else err) from None
                if hook == "planned_config" and result is not None:
                    known = TeacherInfo(result, target.tokenizer)
            # check_with_teacher: the stage's input against the teacher, where both are known now.
            if hasattr(stage_cfg, "check_with_teacher"):
                if index > 0:
                    stage_input = planned_input
                elif self.source is not None:
                    stage_input = source_info = source_info or model_info(self.source)
                else:
                    stage_input = info = info or teacher_info(session)  # the teacher is the first input
                try:
                    if stage_input is not None:
                        stage_cfg.check_with_teacher(stage_input, info := info or teacher_info(session))
                except ConfigError as err:
                    from slimforge.config import FieldError

                    raise (err.at(f"stages.{name}") if isinstance(err, FieldError) else err) from None
            # check_launch: the stage against this launch (its process count), before any stage runs.
            if hasattr(stage_cfg, "check_launch"):
                try:
                    stage_cfg.check_launch(dist.world_size())
                except ConfigError as err:
                    from slimforge.config import FieldError

                    raise (err.at(f"stages.{name}") if isinstance(err, FieldError) else err) from None
            chash = config_hash(stage_cfg)
            parts = [stage_cfg.kind, stage_cfg.method, chash, parent_fp, self.cfg.seed]
            if self.source is not None:
                parts.append(session.teacher_ref.fingerprint)
            if stage_cfg.kind in DATA_KINDS or stage_cfg.uses_data():  # a student stage may read the data too
                data_fp = data_fp or session.data().fingerprint
                parts.append(data_fp)
            fingerprint = stable_hash(parts)
            planned.append(PlannedStage(index, name, stage_cfg, entry, fingerprint, chash,
                                        first if index == 0 else None, parent_fp, dtype_name(session.dtype)))
            parent_fp = fingerprint
        return planned

    def check_conflicts(self, planned: list[PlannedStage]) -> None:
        """Refuse, before doing anything, to replace finished work made differently."""
        if self.cfg.overwrite:
            return
        for stage in planned:
            folder = self.stage_dir(stage.name)
            meta = read_json_or_none(folder / META_FILE, instead=None)
            if meta is None:  # no artifact, or a damaged one that will be made again
                continue
            if meta.get("fingerprint") != stage.fingerprint:
                raise RunDirError(
                    f"{folder} holds stage {stage.name!r} made from a different config or input; "
                    "re-run with overwrite=true to replace it, or use a new run_name"
                )
            if _other_dtype(meta, stage):
                raise RunDirError(
                    f"{folder} holds stage {stage.name!r} made in {meta['dtype']}, and this run is in {stage.dtype}; "
                    f"re-run with dtype={meta['dtype']} to reuse it, overwrite=true to replace it, or use a new run_name"
                )

    def stage_dir(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    # -- executing --

    def execute(self, session: Session, planned: list[PlannedStage]) -> RunResult:
        """Run (or reuse) every planned stage, then the evaluation.

        Raises:
            StageCrash: a stage or the evaluation failed unexpectedly; its traceback is in
                ``run.log``, the finished stages are kept and the same command resumes.
        """
        from slimforge.runlog import crash_boundary

        main = dist.is_main()
        if main:
            ensure_writable_dir(self.run_dir, "run_dir or out_dir")
        dist.barrier()
        lock = run_lock(self.run_dir) if main else contextlib.nullcontext()
        logs = run_logging(self.run_dir) if main else contextlib.nullcontext()

        def boundary(what: str) -> contextlib.AbstractContextManager[None]:
            # Only the main rank logs to run.log; other ranks keep their tracebacks on the console.
            return crash_boundary(what, self.run_dir / RUN_LOG) if main else contextlib.nullcontext()

        with lock, logs:
            dist.on_main(self._start_invocation, session)
            artifacts: dict[str, ModelRef] = {}
            parent = self.source or session.teacher_ref
            for stage in planned:
                stage.parent = parent
                with boundary(f"stage {stage.name!r}"):
                    parent = self.run_stage(session, stage, len(planned))
                artifacts[stage.name] = parent
            with boundary("the evaluation"):
                report = dist.on_main(self.evaluate, session, artifacts)
            dist.on_main(self._end_invocation)
        return RunResult(self.run_dir, self.manifest.data, report or {})

    def evaluate(self, session: Session, artifacts: dict[str, ModelRef]) -> dict[str, Any]:
        """The recipe's evaluation: the teacher and the chosen artifacts, into ``eval/`` and the report.

        Evaluation returns its report; the run records it: in each evaluated artifact's model
        card and in the manifest.
        """
        from slimforge.eval.config import EvalSettings
        from slimforge.eval.runner import TEACHER, evaluate_models, select_models

        cfg = self.cfg.eval
        if not self.recipe.tasks:
            return {}
        students = [(label, ref) for label, ref in select_models(cfg.models, session.teacher_ref, artifacts)
                    if label != TEACHER]
        settings = EvalSettings.from_config(cfg, session.device, session.dtype)
        report = evaluate_models(session, students, self.recipe.tasks, settings, self.run_dir, self.cfg.name,
                                 cfg.gate, log_file=self.run_dir / RUN_LOG)
        report_path = self.run_dir / "report.json"
        from slimforge.models import try_write_model_card

        for label, ref in students:  # each evaluated artifact's card gains its results
            if label in artifacts:
                try_write_model_card(ref.path, report=report, label=label, report_path=report_path)
        self.manifest.data["eval"] = {"models": list(report["models"]), "report": str(report_path),
                                      "gate": report["gate"]["status"]}
        self.manifest.save()
        return report

    def _start_invocation(self, session: Session) -> None:
        self.manifest.data.update({
            "recipe": self.cfg.name, "slimforge_version": __version__,
            "config_hash": stable_hash(self.recipe_yaml),
            "teacher": {"path": session.teacher_ref.path, "fingerprint": session.teacher_ref.fingerprint},
            "pipeline": self.recipe.pipeline,
        })
        if self.source is not None:
            self.manifest.data["source"] = {"path": self.source.path, "fingerprint": self.source.fingerprint}
        self.manifest.data.setdefault("created", now())
        self.manifest.data.setdefault("invocations", []).append(
            {"started": now(), "argv": sys.argv[1:], "world_size": dist.world_size()})
        self.manifest.save()  # first: a folder with a manifest is a run directory (see check_run_dir)
        atomic_write_text(self.run_dir / "config.yaml", self.recipe_yaml)
        log.info("run directory: %s", self.run_dir)

    def _end_invocation(self) -> None:
        self.manifest.data["invocations"][-1]["ended"] = now()
        self.manifest.save()

    def run_stage(self, session: Session, stage: PlannedStage, total: int) -> ModelRef:
        """Run one stage (or reuse its finished artifact); returns the artifact's reference."""
        folder = self.stage_dir(stage.name)
        label = f"[{stage.index + 1}/{total}] {stage.name} ({stage.config.kind}: {stage.config.method})"
        record = StageRecord(stage.name, stage.config.kind, stage.config.method, config_hash=stage.config_hash,
                             fingerprint=stage.fingerprint, artifact=str(folder),
                             parent={"label": stage.parent.label, "path": stage.parent.path,
                                     "fingerprint": stage.parent.fingerprint})
        if dist.on_main(self._reuse, stage, folder, record, label):
            return ModelRef.from_artifact(folder, stage.name)
        if stage.config.kind in TRAINING_KINDS or not dist.is_distributed():
            self._execute_stage(session, stage, folder, record, label)  # every rank trains
        else:
            dist.on_main(self._execute_stage, session, stage, folder, record, label)
        return ModelRef.from_artifact(folder, stage.name)

    def _reuse(self, stage: PlannedStage, folder: Path, record: StageRecord, label: str) -> bool:
        """Whether an undamaged finished artifact with this fingerprint exists (then mark it skipped).

        A damaged one (a file changed, missing or truncated since it was published) is
        reported and made again: the config is the same, so nothing worth keeping is lost,
        and its replacement only takes its place once complete.
        """
        if not (folder / META_FILE).is_file():
            return False
        meta = read_json_or_none(folder / META_FILE, instead=None)
        if meta is not None and (meta.get("fingerprint") != stage.fingerprint or _other_dtype(meta, stage)):
            return False
        damage = f"{META_FILE} is unreadable" if meta is None else artifact_damage(folder)
        if damage:
            log.warning("%s: the finished artifact %s is damaged (%s); making it again", label, folder, damage)
            return False
        previous = self.manifest.stage(stage.name) or {}
        record.status, record.metrics = "skipped", previous.get("metrics", {})
        record.started, record.ended, record.seconds = (previous.get(k) for k in ("started", "ended", "seconds"))
        self.manifest.set_stage(record)
        log.info("%s: unchanged, reusing %s", label, folder)
        if not (folder / "README.md").is_file():  # made before slimforge wrote model cards
            from slimforge.models import try_write_model_card

            try_write_model_card(folder)
        return True

    def _execute_stage(self, session: Session, stage: PlannedStage, folder: Path, record: StageRecord,
                       label: str) -> None:
        main = dist.is_main()
        if main:
            log.info("%s: running", label)
            record.status, record.started = "running", now()
            self.manifest.set_stage(record)
        start = time.perf_counter()
        work = self.run_dir / "work" / stage.name
        work.mkdir(parents=True, exist_ok=True)
        try:
            from transformers import set_seed

            set_seed(self.cfg.seed)
            # Only the main rank publishes the artifact; other ranks write into a throwaway folder.
            out = atomic_dir(folder, replace=True) if main else tempfile.TemporaryDirectory(prefix="slimforge-rank-")
            with out as tmp:
                ctx = StageContext(stage.name, stage.config, stage.parent, session.teacher_ref, session,
                                   Path(tmp), work, self.cfg.seed)
                output: StageOutput = stage.entry.load()(ctx)
                if main:
                    self.write_artifact(Path(tmp), output, self.artifact_meta(stage, output, session))
                    from slimforge.models import try_write_model_card

                    try_write_model_card(Path(tmp), location=folder)  # README.md, part of the atomic artifact
                    # Hashed now, while the files are fresh in the page cache; checked on every reuse.
                    write_checksums(Path(tmp))
        except BaseException as err:
            record.status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            record.error = f"{type(err).__name__}: {err}".splitlines()[0]
            record.ended, record.seconds = now(), round(time.perf_counter() - start, 3)
            self.manifest.set_stage(record)
            raise
        if stage.config.kind in TRAINING_KINDS:
            dist.barrier()  # the artifact exists once the main rank is past here
        if not main:
            return
        record.status, record.ended = "done", now()
        record.seconds = round(time.perf_counter() - start, 3)
        record.metrics = output.metrics
        self.manifest.set_stage(record)
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.parent.rmdir()  # only when no other stage keeps scratch there
        log.info("%s: done in %.1f s -> %s", label, record.seconds, folder)

    def artifact_meta(self, stage: PlannedStage, output: StageOutput, session: Session | None = None) -> dict[str, Any]:
        read_data = session is not None and stage.config.kind in DATA_KINDS and stage.config.uses_data()
        return {
            **({"data": data_record(session.data())} if read_data else {}),
            "stage": stage.name, "kind": stage.config.kind, "method": stage.config.method,
            "parent": {"label": stage.parent.label, "path": stage.parent.path,
                       "fingerprint": stage.parent.fingerprint},
            "teacher": {"path": self.manifest.data["teacher"]["path"],
                        "fingerprint": self.manifest.data["teacher"]["fingerprint"]},
            "config": asdict(stage.config), "config_hash": stage.config_hash,
            "fingerprint": stage.fingerprint, "seed": self.cfg.seed, "dtype": stage.dtype,
            **output.meta, "metrics": output.metrics,
        }

    def write_artifact(self, folder: Path, output: StageOutput, meta: dict[str, Any]) -> None:
        from slimforge.models import write_model_files

        if output.model is not None:
            write_model_files(output.model, output.tokenizer, folder, meta, self.recipe_yaml)
            return
        loadable = ("config.json", "adapter_config.json")
        if not any((folder / name).is_file() for name in loadable) and not any(folder.glob("*.gguf")):
            raise RuntimeError(f"stage {meta['stage']} returned no model and wrote no loadable files")
        existing = read_json(folder / META_FILE) if (folder / META_FILE).is_file() else {}
        config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        described = {"model_type": config.get("model_type"), "architecture": (config.get("architectures") or [None])[0]}
        atomic_write_json(folder / META_FILE, {"slimforge_version": __version__, "created": now(),
                                               **described, **existing, **meta})
        (folder / RECIPE_FILE).write_text(self.recipe_yaml, encoding="utf-8")


# --- entry points ------------------------------------------------------------------------


def prepare(recipe_name: str, overrides: list[str]) -> Recipe:
    """Compose and validate a recipe; raises ConfigError before anything loads."""
    from slimforge.eval.runner import check_eval_models

    recipe = validate_recipe(compose_recipe(recipe_name, overrides))
    check_eval_models(recipe)
    return recipe


@dataclass
class PlannedRun:
    """A run checked and planned up to its first stage: nothing written, the teacher's weights not loaded."""

    run: Run
    session: Session
    stages: list[PlannedStage]

    def execute(self) -> RunResult:
        return self.run.execute(self.session, self.stages)


def plan_run(recipe: Recipe, run_dir: Path, source: ModelRef | None = None) -> PlannedRun:
    """Every check that can fail before a stage runs: the run directory, each stage's plan, conflicts.

    In one process, or on every rank of ``accelerate launch``.
    ``source``: the first stage's input when it is not the teacher (see :class:`Run`).
    """
    dist.ensure_process_group()
    if not dist.is_main():
        log.setLevel(logging.WARNING)  # one rank reports progress
    run_dir = Path(dist.broadcast_object(str(run_dir)))  # one timestamped name for all ranks
    dist.on_main(check_run_dir, run_dir)
    run = Run(recipe, run_dir, source)
    session = Session.for_recipe(recipe, dist.main_then_others(resolve_teacher, recipe))
    planned = dist.main_then_others(run.plan, session)
    dist.on_main(run.check_conflicts, planned)
    return PlannedRun(run, session, planned)


def run_one(recipe: Recipe, run_dir: Path, source: ModelRef | None = None) -> RunResult:
    """Run one recipe into ``run_dir``: in one process, or on every rank of ``accelerate launch``.

    ``source``: the first stage's input when it is not the teacher (see :class:`Run`).
    """
    return plan_run(recipe, run_dir, source).execute()


def run_recipe(recipe_name: str = "default", overrides: list[str] | None = None,
               multirun: bool = False) -> RunResult | list[RunResult]:
    """Compose, validate and run a recipe (or a sweep of it).

    Args:
        recipe_name: shipped recipe name or path to a recipe YAML.
        overrides: Hydra overrides.
        multirun: expand sweep overrides (``key=a,b``) and the recipe's
            ``hydra.sweeper.params`` into one run per combination; implied when
            the recipe sets ``hydra.mode: MULTIRUN``.

    Returns:
        A :class:`RunResult`, or a list of them for a sweep.
    """
    overrides = list(overrides or [])
    if not multirun:
        cfg, multirun = compose_run(recipe_name, overrides)
    if not multirun:
        recipe = validate_recipe(cfg)
        return run_one(recipe, resolve_run_dir(recipe.config))
    jobs = expand_sweep(recipe_name, overrides)
    recipes = [prepare(recipe_name, job) for job in jobs]  # validate every job before running any
    sweep_name = _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-sweep"
    sweep_dir = resolve_run_dir(recipes[0].config, sweep_name=sweep_name)
    dist.on_main(check_sweep_dir, sweep_dir)
    plans: list[PlannedRun] = []
    for index, recipe in enumerate(recipes):  # plan every job (teacher config, data, preflight) before running any
        plans.append(plan_run(recipe, resolve_run_dir(recipe.config, job=index, sweep_name=sweep_name)))
        if index:
            plans[-1].session.release_teacher()  # loaded while planning only for a GGUF teacher; one at a time
    results: list[RunResult] = []
    try:
        for index, (job, plan) in enumerate(zip(jobs, plans)):
            log.info("sweep job %d/%d: %s", index + 1, len(jobs), " ".join(job))
            results.append(plan.execute())
    except BaseException as err:
        if results and dist.is_main():  # the finished jobs still get their report
            try:
                write_sweep(sweep_dir, recipe_name, jobs, plans, results, failure=err)
            except Exception as write_err:  # noqa: BLE001 - the job's own error matters more
                log.warning("could not write the sweep report in %s: %s", sweep_dir, write_err)
        raise
    if dist.is_main():
        write_sweep(sweep_dir, recipe_name, jobs, plans, results)
    return results


def write_sweep(sweep_dir: Path, recipe_name: str, jobs: list[list[str]], plans: list[PlannedRun],
                results: list[RunResult], failure: BaseException | None = None) -> None:
    """``sweep.json`` (every job, with its status) and the sweep report over the finished jobs.

    Jobs run in order, so the first ``len(results)`` finished; the next one stopped with ``failure``.
    """
    stopped = "interrupted" if isinstance(failure, KeyboardInterrupt) else "failed"
    statuses = ["done"] * len(results) + ([stopped] if failure is not None else [])
    statuses += ["not run"] * (len(jobs) - len(statuses))
    atomic_write_json(sweep_dir / SWEEP_FILE, {
        "recipe": recipe_name,
        "jobs": [{"overrides": job, "run_dir": str(plan.run.run_dir), "status": status}
                 for job, plan, status in zip(jobs, plans, statuses)],
    })
    from slimforge.eval.curve import SweepJob
    from slimforge.eval.report import write_sweep_report

    done = []
    for job, plan, result in zip(jobs, plans, results):
        recipe = plan.run.recipe
        stages = [(name, recipe.stages[name].kind, recipe.stages[name].method) for name in recipe.pipeline]
        done.append(SweepJob(result.run_dir.name, result.report, job, recipe.config.description, stages))
    write_sweep_report(sweep_dir, done)
