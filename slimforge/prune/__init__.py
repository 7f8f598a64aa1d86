"""Pruning: unstructured, N:M, structured (depth, width) and mixture-of-experts (experts).

This module only declares registry entries; implementations load on first use. A method is
its module (math and stage function), its schema in :mod:`slimforge.prune.config`, and one
line here.
"""

from slimforge.registry import register

register(
    "prune", "magnitude",
    "slimforge.prune.sparsify:magnitude_stage", "slimforge.prune.config:MagnitudeConfig",
    "zero the smallest weights (unstructured or N:M), no calibration",
)
register(
    "prune", "wanda",
    "slimforge.prune.sparsify:wanda_stage", "slimforge.prune.config:WandaConfig",
    "Wanda: |W| x input-activation norm, per output row (unstructured or N:M)",
)
register(
    "prune", "sparsegpt",
    "slimforge.prune.sparsify:sparsegpt_stage", "slimforge.prune.config:SparseGPTConfig",
    "SparseGPT: OBS pruning with error correction (unstructured or N:M)",
)
register(
    "prune", "depth",
    "slimforge.prune.depth:depth_stage", "slimforge.prune.config:DepthConfig",
    "remove decoder layers by Block Influence, angular distance, or a list",
)
register(
    "prune", "width",
    "slimforge.prune.width:width_stage", "slimforge.prune.config:WidthConfig",
    "Minitron-style width pruning of MLP channels, heads and hidden channels",
)
register(
    "prune", "experts",
    "slimforge.prune.experts:experts_stage", "slimforge.prune.expert_config:ExpertsConfig",
    "MoE expert pruning: drop or merge the least salient experts (REAP or frequency), lower top-k",
)
register(
    "prune", "search",
    "slimforge.prune.search:search_stage", "slimforge.prune.search_config:SearchConfig",
    "search depth x width shapes to a parameter budget; keep the lowest KL after a short heal",
)
