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
    "greedy generation (shipped completion, summarization, translation sets or your jsonl), scored by "
    "ROUGE-L / chrF against references, the teacher's perplexity and agreement with the teacher",
)
register(
    "eval", "efficiency",
    "slimforge.eval.efficiency:efficiency_task", "slimforge.eval.config:EfficiencyTaskConfig",
    "parameters, size on disk, peak memory, prefill / decode tokens/s, latency",
)
register(
    "eval", "speculative",
    "slimforge.eval.speculative:speculative_task", "slimforge.eval.config:SpeculativeTaskConfig",
    "the model as a draft for its teacher: acceptance rate, tokens per round, the teacher's greedy speed-up "
    "(identical output), and the cost model's prediction",
)
register(
    "eval", "bias",
    "slimforge.eval.bias:bias_task", "slimforge.eval.config:BiasTaskConfig",
    "BBQ-style social bias (ambiguous and disambiguated questions), and each student's shift from the teacher",
)
