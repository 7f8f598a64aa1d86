"""Which text each data task read, and whether the students were healed on it.

A task that reads the run's data (the text the stages calibrated and trained on) measures
*in-domain*; a task with a corpus of its own (``data: {asset: wikipedia}``) measures
*out-of-domain*, unless that corpus is the run's data after all (the same source
fingerprint): then it is labelled in-domain, with a warning, since a score on text the
students trained on says nothing about text they never saw.
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.config import DataConfig, TaskConfig
    from slimforge.session import Session

log = logging.getLogger(__name__)

IN_DOMAIN = "in-domain"
OUT_OF_DOMAIN = "out-of-domain"


def corpus_name(cfg: DataConfig) -> str:
    """The corpus in a word: its asset's name, the last part of its path or hub id, or ``teacher_generated``."""
    if cfg.format == "teacher_generated":
        return "teacher_generated"
    if cfg.path:
        return PurePosixPath(cfg.path.rstrip("/")).name or cfg.path
    return str(cfg.asset)


def task_corpora(tasks: dict[str, TaskConfig], session: Session,
                 data_fps: dict[str, str]) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The corpus label of every task that reads text, and a warning per own corpus that is the run's data.

    Args:
        tasks: the evaluation's tasks.
        session: gives the run's data and each task's own corpus (already built: preflight did).
        data_fps: task name -> the fingerprint of the blocks it reads.

    Returns:
        task name -> ``corpus`` (a word), ``split`` (the task's ``split`` field: ``heldout`` or
        ``train``), ``domain`` (:data:`IN_DOMAIN` or :data:`OUT_OF_DOMAIN`) and ``data_fingerprint``;
        and the warnings.
    """
    labels: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    run_source: str | None = None
    for name, cfg in tasks.items():
        if not cfg.USES_DATA:
            continue
        own = cfg.own_data()
        if own is None:
            labels[name] = {"corpus": corpus_name(session.data_config), "domain": IN_DOMAIN}
        else:
            if run_source is None:
                run_source = session.data_source().fingerprint
            trained_on = session.data(own).source_fingerprint == run_source
            labels[name] = {"corpus": corpus_name(own), "domain": IN_DOMAIN if trained_on else OUT_OF_DOMAIN}
            if trained_on:
                warnings.append(f"eval task {name!r} reads {corpus_name(own)}, the run's own data (the text the "
                                "students trained on): it is labelled in-domain, not out-of-domain; give it other "
                                "text to measure what the students keep on text they never saw")
                log.warning(warnings[-1])
        labels[name].update(split=getattr(cfg, "split", None), data_fingerprint=data_fps.get(name))
    return labels, warnings
