"""Finished stages stay reusable across refactors: every shipped recipe's stage config hashes are pinned.

A stage's fingerprint hashes its kind, method and config (``pipeline.config_hash``) with its
parent's. If a schema gains, loses or renames a field, or a default changes, these hashes
change and every run directory made before that change would redo its stages. When such a
change is meant, regenerate the file and say so in the commit:
``python tests/test_config_hash_stability.py > tests/assets/stage_config_hashes.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

GOLDEN = Path(__file__).parent / "assets" / "stage_config_hashes.json"
# Recipes that need a value from the command line before they validate.
REQUIRED = {"ci_gate": ["stages.candidate.path=/models/candidate"]}


def current_hashes() -> dict[str, dict[str, list[str]]]:
    """recipe -> stage -> [kind, method, config hash], for every shipped recipe."""
    from slimforge.pipeline import config_hash, prepare
    from slimforge.recipes import list_recipes

    out = {}
    for name in list_recipes():
        recipe = prepare(name, REQUIRED.get(name, []))
        out[name] = {stage: [recipe.stages[stage].kind, recipe.stages[stage].method,
                             config_hash(recipe.stages[stage])] for stage in recipe.pipeline}
    return out


def test_stage_config_hashes_are_unchanged():
    golden = json.loads(GOLDEN.read_text())
    assert current_hashes() == golden


if __name__ == "__main__":
    os.environ.setdefault("SLIMFORGE_OFFLINE", "1")
    json.dump(current_hashes(), sys.stdout, indent=1, sort_keys=True)
    print()
