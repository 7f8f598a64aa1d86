"""The KD divergences a recipe may name (``distill.loss``): the one list the schema and the math read.

Each name is a function of the same name in :mod:`slimforge.distill.losses`, which
builds its :data:`~slimforge.distill.losses.DIVERGENCES` table from this one; the value
is the config parameter the divergence takes (``beta`` or ``alpha``), or None. Kept free
of torch so that validating a recipe stays fast. Adding a divergence: write its function
in ``losses.py`` and add one line here.
"""

from __future__ import annotations

KD_LOSSES: dict[str, str | None] = {
    "forward_kl": None,
    "reverse_kl": None,
    "jsd": "beta",
    "tvd": None,
    "skew_forward_kl": "alpha",
    "skew_reverse_kl": "alpha",
    "jeffreys": None,
    "adaptive_kl": None,
}
