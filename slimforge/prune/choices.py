"""The names each pruning choice accepts: the one list the schemas validate against (before
torch loads) and the math dispatches on. ``tests/test_prune_choices.py`` runs every name
through the math, so a name added here without an implementation fails there.
"""

from __future__ import annotations

PER_CHOICES = ("row", "layer")  # where unstructured sparsity is counted: each output row, or the whole matrix
DEPTH_CRITERIA = ("block_influence", "angular", "list")  # which layers depth pruning removes
HEAD_MODES = ("query", "group")  # how width pruning drops heads under GQA
WIDTH_AXES = ("mlp", "heads", "hidden")  # what a width pruning budget may shrink
EXPERT_SCORES = ("reap", "frequency")  # how expert pruning ranks the experts of an MoE layer
