"""On-policy distillation (GKD, Agarwal et al. 2024): learn on sequences the student itself writes.

For a seeded fraction of micro-batches, each block's first ``prompt_tokens``
tokens become a prompt; the student (or, for sequence-level KD, the teacher)
continues it with sampling, batched, with the KV cache and without gradients.
The loss then covers only the generated tokens (up to and including the first
end-of-sequence), with the teacher scoring exactly those sequences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slimforge.distill.config import OnPolicySpec


class OnPolicy:
    def __init__(self, spec: OnPolicySpec, seed: int) -> None:
        self.spec = spec
        self.seed = seed

    def use_for(self, micro_step: int) -> bool:
        """Whether this micro-batch is on-policy: a pure function of the seed and the step."""
        return bool(np.random.default_rng([self.seed, 0x6B64, micro_step]).random() < self.spec.fraction)

    @torch.no_grad()
    def rollout(self, trainer: Any, student: Any, batch: dict[str, Any]) -> dict[str, Any]:
        spec = self.spec
        prompts = batch["input_ids"][:, : spec.prompt_tokens]
        model = student if spec.source == "student" else trainer.teacher
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        pad = model.generation_config.pad_token_id
        pad = eos if pad is None else pad
        was_training = model.training
        model.eval()
        sequences = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                   max_new_tokens=spec.max_new_tokens, do_sample=True,
                                   temperature=spec.temperature, top_k=0, top_p=1.0,
                                   pad_token_id=pad, use_cache=True)
        model.train(was_training)
        return generated_batch(sequences, spec.prompt_tokens, eos)


def generated_batch(sequences: torch.Tensor, prompt_len: int, eos: int | None) -> dict[str, Any]:
    """Masks for prompt + continuation: the loss covers generated tokens through the first EOS."""
    length = sequences.shape[1]
    positions = torch.arange(length, device=sequences.device).expand_as(sequences)
    generated = positions >= prompt_len
    if eos is not None:
        is_eos = (sequences == eos) & generated
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(is_eos[:, 0], length, dtype=torch.long))
        alive = positions <= first.unsqueeze(1)
    else:
        alive = torch.ones_like(generated)
    attention = alive.long()
    return {"input_ids": sequences, "loss_mask": (generated & alive).long(), "attention_mask": attention,
            "generated": True}
