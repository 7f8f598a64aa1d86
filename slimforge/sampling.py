"""Sampling the teacher's answers in batches, each sample from its own random stream.

:class:`SeededSampler` applies temperature, top-k and top-p with transformers' own warpers,
then picks each row's token by inverse CDF from that row's generator (seeded by the run's
seed and the sample's index) and hands ``generate`` a one-hot choice, which its greedy step
takes. Sampling stays ``generate``'s loop (KV cache, EOS, padding); only the randomness is
ours, so a sample does not depend on the batch it was in, the batch size, or where an
interrupted run resumed (up to float rounding across padding lengths).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from slimforge.config import GenerateConfig
from slimforge.errors import DataError
from slimforge.prompts import Prompt


def sample_generator(seed: int, index: int) -> torch.Generator:
    """Sample ``index``'s own random stream (on the CPU, so every device draws the same numbers)."""
    state = np.random.SeedSequence([seed, 0x67656E, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def pick_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: per row, the first token whose cumulative probability exceeds ``u * total``.

    Args:
        probs: [B, V] probabilities (zeros where a warper removed a token).
        uniforms: [B] draws in [0, 1).

    Returns:
        [B, 1] token ids; a token of probability zero is never picked.
    """
    cdf = probs.cumsum(-1)
    target = (uniforms.to(cdf) * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)


def sampling_warpers(cfg: GenerateConfig) -> list[Any]:
    """transformers' temperature, top-k and top-p warpers, in generate's own order."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers: list[Any] = [TemperatureLogitsWarper(cfg.temperature)]
    if cfg.top_k:
        warpers.append(TopKLogitsWarper(top_k=cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=cfg.top_p))
    return warpers


class SeededSampler:
    """A logits processor that samples each row from its own generator and returns a one-hot choice.

    Given to ``generate`` with ``do_sample=False``, whose greedy step then takes exactly this
    choice: sampling stays generate's loop (KV cache, EOS, padding), only the randomness is ours.
    """

    def __init__(self, warpers: list[Any], generators: list[torch.Generator]) -> None:
        self.warpers = warpers
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        uniforms = torch.stack([torch.rand((), generator=g) for g in self.generators])
        choice = torch.full_like(scores, float("-inf"))
        return choice.scatter_(1, pick_tokens(probs, uniforms), 0.0)


def prompt_ids(prompt: Prompt, tokenizer: Any, chat: bool) -> list[int]:
    """A prompt's token ids: rendered with the chat template (and the generation prompt), or as plain text."""
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        raise DataError("chat 'messages' prompts need the chat template; set data.generate.chat_template "
                        "to true or null, or give plain 'prompt' strings")
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) [B, longest], padded on the left so every row ends where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids, mask


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end an answer: the generation config's (a chat model's end-of-turn), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None]


def answer(new: list[int], eos: list[int]) -> tuple[list[int], bool]:
    """The generated ids before the first EOS, and whether an EOS ended them."""
    for pos, token in enumerate(new):
        if token in eos:
            return new[:pos], True
    return new, False


@torch.no_grad()
def generate_batch(model: Any, tokenizer: Any, prompts: list[Prompt], indices: list[int], cfg: GenerateConfig,
                   chat: bool) -> list[dict[str, Any]]:
    """One record per prompt: the teacher's answer, sampled from sample ``indices[i]``'s own stream."""
    stop = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stop[0] if stop else 0)
    rows = [prompt_ids(p, tokenizer, chat) for p in prompts]
    ids, mask = left_pad(rows, pad)
    device = next(model.parameters()).device
    processors = None
    if cfg.do_sample:
        from transformers import LogitsProcessorList

        sampler = SeededSampler(sampling_warpers(cfg), [sample_generator(cfg.seed, i) for i in indices])
        processors = LogitsProcessorList([sampler])
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=cfg.max_new_tokens,
                         do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
                         repetition_penalty=1.0, eos_token_id=stop or None, pad_token_id=pad, use_cache=True,
                         logits_processor=processors)
    records = []
    for index, prompt, prompt_row, new in zip(indices, prompts, rows, out[:, ids.shape[1]:].tolist()):
        kept, finished = answer(new, stop)
        records.append({"index": index, "prompt": prompt, "response": tokenizer.decode(kept, skip_special_tokens=True),
                        "prompt_tokens": len(prompt_row), "new_tokens": len(kept), "finished": finished})
    return records
