"""Evaluation of the teacher and its students with identical settings.

This module only declares registry entries (eval task types); implementations
load on first use.
"""

from slimforge.registry import register

register(
    "eval", "perplexity",
    "slimforge.eval.perplexity:perplexity_task", "slimforge.eval.config:PerplexityTaskConfig",
    "token perplexity over fixed-length held-out blocks",
)
