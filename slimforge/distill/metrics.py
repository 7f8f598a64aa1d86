"""What a distillation run reports: held-out metrics, the experiment trackers' scalars and the log line per evaluation.

The trackers are accelerate's (TensorBoard, MLflow, W&B), handed to the run's ``Accelerator`` as
``log_with`` on the main process only; each writes inside the stage's folder (see
:mod:`slimforge.distill.tracker_names`): MLflow to a local file store, W&B offline, never a server.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.tracking import GeneralTracker, MLflowTracker

from slimforge.distill.losses import divergence, topk_bucket_logprobs
from slimforge.distill.tracker_names import TRACKERS

log = logging.getLogger(__name__)

# The MLflow experiment and the W&B project every stage reports to (each run is named after its stage).
TRACKING_PROJECT = "slimforge"


@torch.no_grad()
def heldout_batches(student: Any, heldout: Any, blocks: list[int], batch_size: int, device: torch.device
                    ) -> Iterable[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The student on held-out ``blocks``, ``batch_size`` at a time, in eval mode (restored afterwards).

    Yields ``(block indices, ids [B, L], fp32 logits [B * (L - 1), V], next-token targets [B * (L - 1)])``;
    call it under ``torch.no_grad()``.
    """
    from slimforge.data import blocks_tensor

    was_training = student.training
    student.eval()
    try:
        for start in range(0, len(blocks), batch_size):
            batch = blocks[start: start + batch_size]
            ids = blocks_tensor(heldout.select(batch)).to(device)
            logits = student(input_ids=ids, use_cache=False).logits[:, :-1].float()
            yield batch, ids, logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    finally:
        student.train(was_training)


def heldout_metrics(student: Any, heldout: Any, blocks: list[int], batch_size: int, device: torch.device,
                    teacher: Any = None, cache: Any = None) -> dict[str, float]:
    """Held-out forward KL(teacher || student) at T = 1, student CE and perplexity, top-1 agreement.

    Args:
        student: the model to measure (put back in its training mode afterwards).
        heldout: the packed held-out split; ``blocks`` the indices of it to read.
        batch_size: blocks per forward pass.
        device: where the blocks go.
        teacher, cache: the live teacher, or its top-k cache (one of them). A cache built at a
            temperature other than 1 gives no KL (``eval_kl`` is left out).
    """
    kl_sum = ce_sum = agree = count = 0.0
    for batch, ids, logits, targets in heldout_batches(student, heldout, blocks, batch_size, device):
        ce_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        if cache is not None:
            top_ids, top_logp = cache.lookup("heldout", batch, device)
            top_ids = top_ids.reshape(-1, top_ids.shape[-1])
            s_logp = topk_bucket_logprobs(logits, top_ids) if cache.meta["temperature"] == 1.0 else None
            t_logp = top_logp.reshape(-1, top_logp.shape[-1]).float()
            if s_logp is not None:
                kl_sum += divergence("forward_kl", s_logp, t_logp).sum().item()
            teacher_top1 = top_ids[:, 0]
        else:
            t_logits = teacher(input_ids=ids, use_cache=False).logits[:, :-1].float()
            t_logits = t_logits.reshape(-1, t_logits.shape[-1])
            kl_sum += divergence("forward_kl", F.log_softmax(logits, -1), F.log_softmax(t_logits, -1)).sum().item()
            teacher_top1 = t_logits.argmax(-1)
        agree += (logits.argmax(-1) == teacher_top1).sum().item()
        count += targets.numel()
    out = {"eval_ce": ce_sum / count, "eval_ppl": math.exp(ce_sum / count), "eval_top1": agree / count}
    if cache is None or cache.meta["temperature"] == 1.0:
        out["eval_kl"] = kl_sum / count
    return out


# --- the experiment trackers ------------------------------------------------------------------


class LocalMLflowTracker(MLflowTracker):
    """accelerate's MLflow tracker on a local file store in ``folder``: never a server.

    MLflow logs through its process-wide tracking URI, so the store is set when the run starts
    and the previous URI is put back when it finishes (a later stage sets its own).
    """

    # MLflow 3 refuses a file store unless allowed (the store is in maintenance mode, yet it is the
    # one that needs no database package and no server); its telemetry would be network traffic.
    ENVIRONMENT = {"MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}

    def __init__(self, folder: Path, run_name: str) -> None:
        super().__init__(experiment_name=TRACKING_PROJECT, run_name=run_name)
        self.store_uri = folder.resolve().as_uri()
        self.saved_environment: dict[str, str | None] = {}
        self.previous_uri: str | None = None

    def start(self) -> None:
        self.saved_environment = {key: os.environ.get(key) for key in self.ENVIRONMENT}
        os.environ.update(self.ENVIRONMENT)
        import mlflow  # after the environment: MLflow decides on telemetry when it is first imported

        self.previous_uri = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
        mlflow.set_tracking_uri(self.store_uri)
        super().start()

    def finish(self) -> None:
        import mlflow

        try:
            super().finish()
        finally:
            mlflow.set_tracking_uri(self.previous_uri)
            for key, value in self.saved_environment.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _tensorboard_tracker(folder: Path, run_name: str) -> GeneralTracker:
    from accelerate.tracking import TensorBoardTracker

    # accelerate writes to <logging_dir>/<run_name>: give the folder's parent and name, so the
    # events land in the folder itself, as they always have.
    return TensorBoardTracker(folder.name, folder.parent)


def _wandb_tracker(folder: Path, run_name: str) -> GeneralTracker:
    from accelerate.tracking import WandBTracker

    # Offline whatever WANDB_MODE says (an argument to wandb.init wins over it): `wandb sync`
    # uploads the run later, if wanted. wandb puts its runs in <dir>/wandb, which is ``folder``.
    # console="off": wandb would otherwise wrap the process's stdout and stderr.
    return WandBTracker(TRACKING_PROJECT, dir=str(folder.parent), mode="offline", name=run_name,
                        settings={"console": "off", "quiet": True})


TRACKER_BUILDERS = {"tensorboard": _tensorboard_tracker, "mlflow": LocalMLflowTracker, "wandb": _wandb_tracker}


def build_trackers(names: Iterable[str], stage_dir: Path, run_name: str) -> list[GeneralTracker]:
    """One accelerate tracker per name, each writing in its folder inside ``stage_dir``; none started yet."""
    return [TRACKER_BUILDERS[name](stage_dir / TRACKERS[name].folder, run_name) for name in names]


def tracker_config(cfg: Any, seed: int) -> dict[str, Any]:
    """The stage's settings as trackers record them: flat dotted keys (``lora.r``), lists as JSON text.

    The fields the config hash leaves out (where the stage reports) are left out here too.
    """
    from slimforge.config import hashed_config

    flat: dict[str, Any] = {}

    def walk(values: dict[str, Any], prefix: str) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                scalar = value is None or isinstance(value, bool | int | float | str)
                flat[prefix + key] = value if scalar else json.dumps(value)

    walk(hashed_config(cfg), "")
    return {**flat, "seed": seed}


class RunLog:
    """Where a run reports: the Accelerator's trackers (started here) and one log line per evaluation.

    Args:
        acc: the run's Accelerator; its ``log_with`` holds the trackers on the main process
            (:func:`build_trackers`) and nothing on the others, so only the main process reports.
        log_every: training scalars every this many steps (evaluations are always reported).
        config: what the trackers record as the run's settings (:func:`tracker_config`).
    """

    def __init__(self, acc: Any, log_every: int, config: dict[str, Any]) -> None:
        self.acc = acc
        self.log_every = log_every
        if acc.log_with:
            acc.init_trackers(TRACKING_PROJECT, config)

    def step(self, step: int, loss: float, lr: float, tokens_per_s: float, stats: dict[str, float]) -> None:
        """The training scalars of one optimizer step."""
        if not self.acc.trackers or step % self.log_every:
            return
        self.acc.log({"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tokens_per_s,
                      **{f"train/{key}": value for key, value in stats.items()}}, step=step)

    def evaluation(self, record: dict[str, Any]) -> None:
        """A history record (step, tokens, train loss, ``eval_*`` metrics): its scalars and a log line."""
        if self.acc.trackers:
            self.acc.log({f"eval/{key[5:]}": value for key, value in record.items() if key.startswith("eval_")},
                         step=record["step"])
        log.info("step %d: %s", record["step"], json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                            for k, v in record.items()}))

    def close(self) -> None:
        """Finish every tracker (once). Not ``acc.end_training()``: that also destroys the process
        group, which the pipeline still needs after training under DDP."""
        trackers, self.acc.trackers = list(self.acc.trackers), []
        for tracker in trackers:
            tracker.finish()
