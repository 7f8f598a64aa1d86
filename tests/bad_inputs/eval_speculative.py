"""Bad input to the speculative-decoding task: refused in one line while the recipe is validated."""

from __future__ import annotations

from pathlib import Path

from bad_inputs.harness import BadInput, Env


def _nothing_ran(env: Env) -> None:
    assert not (env.tmp / "run").exists(), "the run started before the recipe was refused"


def _spec(*settings: str):
    def build(env: Env) -> list[str]:
        return env.tiny_run(env.tmp / "run", "data.block_size=32", "+eval.tasks.spec.type=speculative",
                            *(f"+eval.tasks.spec.{s}" for s in settings))
    return build


def _sliding_window_teacher(env: Env) -> Path:
    """A tiny 2-layer Mistral whose sliding window (16 tokens) is shorter than the decode below."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", vocab_size=len(env.tokenizer), hidden_size=32, intermediate_size=48,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    folder = env.tmp / "mistral"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    env.tokenizer.save_pretrained(folder)
    return folder


def _tree_on_a_short_window(env: Env) -> list[str]:
    argv = _spec("lookup=3", "prompt_tokens=8", "new_tokens=16")(env)
    return [f"teacher.path={_sliding_window_teacher(env)}" if a.startswith("teacher.path=") else a for a in argv]


CASES = [
    BadInput("prompt-longer-than-a-block", _spec("prompt_tokens=64"),
             r"invalid value eval\.tasks\.spec\.prompt_tokens=64: a prompt is cut from one held-out block, and "
             r"data\.block_size is 32; lower prompt_tokens or raise data\.block_size$", after=_nothing_ran),
    BadInput("no-drafts", _spec("k=0"), r"invalid value eval\.tasks\.spec\.k=0: must be between 1 and 64$", after=_nothing_ran),
    # 8 + 16 + k 4 (the default) + width 1 + a lookup branch of up to 9: 38 positions, past the teacher's window.
    BadInput("tree-on-a-short-sliding-window", _tree_on_a_short_window,
             r"the speculative task \(width=1, lookup=3\): verifying a draft tree needs full attention, and the teacher's "
             r"sliding window \(16 tokens\) is shorter than the decode's 38 positions \(prompt, new tokens, one round's "
             r"drafts\); set width: 1 and lookup: 0, or shorten the decode$", after=_nothing_ran),
    BadInput("no-candidates", _spec("width=0"), r"invalid value eval\.tasks\.spec\.width=0: must be between 1 and 64$",
             after=_nothing_ran),
    BadInput("budget-of-one-position", _spec("lookup=3", "budget=1"),
             r"invalid value eval\.tasks\.spec\.budget='1': must be auto \(from the teacher's measured pass cost\), an "
             r"integer >= 2 \(positions a round's verification may hold\) or null \(no cap\)$", after=_nothing_ran),
    BadInput("budget-not-a-number", _spec("budget=fast"),
             r"invalid value eval\.tasks\.spec\.budget='fast': must be auto", after=_nothing_ran),
]
