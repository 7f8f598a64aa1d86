"""The experiment trackers a distillation stage may report to (``distill.trackers``): the one list of them.

Each tracker names the module its package installs (what must be importable to use it) and the
folder it writes inside the stage's folder (``fsutil.LOG_DIRS`` keeps those out of the artifact's
checksums). The schema checks names and packages against this table before any model loads, so
it stays free of torch and of the trackers themselves; :mod:`slimforge.distill.metrics` builds one
accelerate tracker per name. Adding a tracker: one line here and its builder there.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class TrackerSpec(NamedTuple):
    package: str  # the module its package installs
    folder: str   # where it writes, inside the stage's folder


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec("tensorboard", "tensorboard"),
    "mlflow": TrackerSpec("mlflow", "mlruns"),
    "wandb": TrackerSpec("wandb", "wandb"),
}

# What installs every optional tracker's package (TensorBoard is a core dependency).
TRACKING_EXTRA = "pip install 'slimforge[tracking]'"


def missing_tracker_packages(names: Iterable[str]) -> list[str]:
    """The trackers among ``names`` whose package is not installed (found without importing it)."""
    import importlib.util

    return [name for name in names if importlib.util.find_spec(TRACKERS[name].package) is None]
