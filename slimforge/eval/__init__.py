"""Evaluation of the teacher and its students with identical settings.

This module only declares registry entries (eval task types); implementations
load on first use.
"""

from slimforge.registry import register

register(
    "eval", "perplexity",
    "slimforge.eval.perplexity:perplexity_task", "slimforge.eval.config:PerplexityTaskConfig",
    "token perplexity over fixed-length held-out blocks, with KL / top-1 fidelity to the teacher",
)
register(
    "eval", "word_perplexity",
    "slimforge.eval.word_perplexity:word_perplexity_task", "slimforge.eval.config:WordPerplexityTaskConfig",
    "lm-eval's word and byte perplexity (rolling log-likelihood) over held-out text",
)
register(
    "eval", "lm_eval",
    "slimforge.eval.harness:harness_task", "slimforge.eval.config:HarnessTaskConfig",
    "an lm-evaluation-harness task or group (offline ones ship in recipes/tasks)",
)
register(
    "eval", "generation",
    "slimforge.eval.generation:generation_task", "slimforge.eval.config:GenerationTaskConfig",
    "batched greedy generation over jsonl prompts, scored by ROUGE-L and chrF",
)
register(
    "eval", "efficiency",
    "slimforge.eval.efficiency:efficiency_task", "slimforge.eval.config:EfficiencyTaskConfig",
    "parameters, size on disk, peak memory, prefill / decode tokens/s, latency",
)
