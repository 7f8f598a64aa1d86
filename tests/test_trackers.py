"""Experiment trackers (``distill.trackers``): accelerate's TensorBoard, MLflow and W&B trackers on a tiny run.

Each tracker is read back with its own reader (TensorBoard's event reader, MLflow's client on the
file store, wandb's record schema on the offline run's transaction log), and what it holds is
compared with what the stage recorded in ``slimforge.json``: the same losses at the same steps.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM

from slimforge import cli, dist
from slimforge.config import DataConfig, FieldError
from slimforge.distill.config import DistillConfig
from slimforge.distill.metrics import TRACKER_BUILDERS, TRACKING_PROJECT
from slimforge.distill.tracker_names import TRACKERS
from slimforge.distill.trainer import DistillTrainer
from slimforge.fsutil import LOG_DIRS, checksum_problem, read_json
from slimforge.pipeline import config_hash

TINY_DISTILL = str(REPO / "tests" / "assets" / "recipes" / "tiny_distill.yaml")


def tiny_run(teacher_dir: Path, corpus_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    """``slimforge run`` of the tiny student + distill recipe: 3 steps, held-out metrics at steps 2 and 3."""
    return ["run", TINY_DISTILL, f"teacher.path={teacher_dir}", f"data.path={corpus_dir}",
            "stages.student.num_layers=2", f"run_dir={run_dir}", "stages.heal.steps=3",
            "stages.heal.eval_every=2", "stages.heal.eval_blocks=2", "~eval.tasks.perplexity", *extra]


# --- readers, one per tracker -------------------------------------------------------------------


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_runs(store: Path, monkeypatch) -> list:
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads file stores only when allowed
    client = mlflow.MlflowClient(tracking_uri=store.resolve().as_uri())
    experiment = client.get_experiment_by_name(TRACKING_PROJECT)
    runs = client.search_runs([experiment.experiment_id])
    return [(run, {key: {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
                   for key in run.data.metrics}) for run in runs]


def wandb_records(path: Path) -> list:
    """The records of an offline run's ``.wandb`` file, decoded with wandb's own protobuf schema.

    The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then records in
    32 KiB blocks, each chunk with a 7-byte header (crc32, length, type: full/first/middle/last).
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records: list) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if not key.startswith("_"):
                    out.setdefault(key, {})[int(row["_step"])] = value
    return out


# --- the run ------------------------------------------------------------------------------------


def test_every_tracker_reports_the_runs_metrics(teacher_dir, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # the stage's W&B run is offline whatever the environment says
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))  # wandb-core's own debug log
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    assert cli.main(tiny_run(teacher_dir, corpus_dir, run_dir, "stages.heal.trackers=[tensorboard,mlflow,wandb]")) == 0
    stage = run_dir / "stages" / "heal"
    meta = read_json(stage / "slimforge.json")
    losses = dict(enumerate(meta["distill"]["losses"], start=1))
    eval_kl = {r["step"]: r["eval_kl"] for r in meta["distill"]["history"]}
    assert sorted(eval_kl) == [2, 3]

    scalars = tensorboard_scalars(stage / "tensorboard")
    assert scalars["train/loss"] == pytest.approx(losses, abs=1e-6)  # slimforge.json rounds to 6 places
    assert scalars["eval/kl"] == pytest.approx(eval_kl, rel=1e-6)  # TensorBoard stores float32
    assert {"train/lr", "train/tokens_per_s", "eval/ce", "eval/top1"} <= set(scalars)

    import mlflow

    assert not mlflow.is_tracking_uri_set()  # the stage put MLflow's tracking URI back as it found it
    (run, metrics), = mlflow_runs(stage / "mlruns", monkeypatch)
    assert run.info.run_name == "heal" and run.info.status == "FINISHED"
    assert run.data.params["lr"] == "0.003" and run.data.params["lora.r"] == "16"
    assert metrics["train/loss"] == pytest.approx(losses, abs=1e-6)
    assert metrics["eval/kl"] == pytest.approx(eval_kl, rel=1e-12)

    (offline,) = (stage / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(offline)
    history = wandb_history(records)
    assert history["train/loss"] == pytest.approx(losses, abs=1e-6)
    assert history["eval/kl"] == pytest.approx(eval_kl, rel=1e-12)
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for item in r.config.update}
    assert config["lr"] == 0.003 and config["seed"] == 0

    # The trackers' folders are logs, not part of the model: checksums skip them, the folder still loads.
    assert checksum_problem(stage) is None
    assert not any(name.split("/")[0] in LOG_DIRS for name in read_json(stage / "checksums.json")["files"])
    assert AutoModelForCausalLM.from_pretrained(stage).config.num_hidden_layers == 2


# --- which trackers, on which process ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pair(teacher_dir, corpus_dir, tokenizer, tmp_path_factory):
    from slimforge.data import build_data

    bundle = build_data(DataConfig(path=str(corpus_dir), block_size=32, heldout_fraction=0.2), tokenizer,
                        cache_dir=tmp_path_factory.mktemp("data"))
    return AutoModelForCausalLM.from_pretrained(teacher_dir).eval(), bundle


@pytest.mark.parametrize(("trackers", "main", "expected"), [
    (["tensorboard"], True, ["tensorboard"]),
    ([], True, []),  # an empty list reports to no tracker
    (["tensorboard", "mlflow"], False, []),  # a rank other than the main one reports nothing
])
def test_trackers_write_only_what_is_asked_and_only_on_the_main_process(tiny_pair, tmp_path, monkeypatch, trackers,
                                                                        main, expected):
    teacher, bundle = tiny_pair
    monkeypatch.setattr(dist, "is_main", lambda: main)
    cfg = DistillConfig(steps=1, batch_size=2, eval_blocks=1, warmup_steps=0, trackers=trackers)
    student = AutoModelForCausalLM.from_pretrained(teacher.name_or_path)
    stage = tmp_path / "stage"
    stage.mkdir()
    DistillTrainer(cfg, student, bundle, tmp_path / "work", stage, seed=0, device=torch.device("cpu"),
                   teacher=teacher).train()
    assert sorted(p.name for p in stage.iterdir()) == expected


# --- configuration ----------------------------------------------------------------------------


def test_every_tracker_has_a_builder_and_a_log_folder():
    assert set(TRACKER_BUILDERS) == set(TRACKERS)
    assert {spec.folder for spec in TRACKERS.values()} <= LOG_DIRS


def test_trackers_stay_out_of_the_config_hash():
    """Where a stage reports is not what it makes: no tracker choice redoes a finished stage."""
    default = config_hash(DistillConfig())
    assert config_hash(DistillConfig(trackers=[])) == default
    assert config_hash(DistillConfig(trackers=["mlflow", "wandb"])) == default
    assert config_hash(DistillConfig(lr=1e-3)) != default


def test_checkpoints_resume_under_other_trackers():
    from types import SimpleNamespace

    from slimforge.distill.checkpoints import made_under

    def record(cfg):
        return made_under(cfg, 0, torch.nn.Linear(2, 2), SimpleNamespace(fingerprint="data", train=[0, 1]), None,
                          None, {})

    assert record(DistillConfig(trackers=["mlflow"])) == record(DistillConfig())
    assert record(DistillConfig(lr=1e-3)) != record(DistillConfig())


@pytest.mark.parametrize(("trackers", "message"), [
    (["tensorboard", "neptune"], "each must be one of tensorboard, mlflow, wandb"),
    (["wandb", "wandb"], "lists wandb more than once"),
])
def test_bad_tracker_lists_are_refused(trackers, message):
    with pytest.raises(FieldError, match=message):
        DistillConfig(trackers=trackers).check()


def test_a_tracker_whose_package_is_missing_is_refused_before_anything_runs(teacher_dir, corpus_dir, tmp_path,
                                                                            monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    run_dir = tmp_path / "run"
    assert cli.main(tiny_run(teacher_dir, corpus_dir, run_dir, "stages.heal.trackers=[tensorboard,wandb]")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("slimforge: error:")]
    assert errors == ["slimforge: error: invalid value stages.heal.trackers=['tensorboard', 'wandb']: not installed: "
                      "wandb; pip install 'slimforge[tracking]' (or take it off the list)"]
    assert not (run_dir / "stages").exists()
