"""The draft head over frequent tokens (FR-Spec) against the full head, for one trained draft, same run.

Loads the embedded SmolLM2-135M teacher and a draft folder (e.g. a ``draft_speculative`` run's
``stages/draft``), takes prompts from teacher-generated answers the draft never trained on (the
last ones of the cached ``teacher_generated`` corpus), and decodes each greedily with the teacher
alone (the baseline), then speculatively with the draft's full head and with heads over the
``--sizes`` most frequent tokens of the other answers, for each ``--k``, draft-tree ``--width``
and context ``--lookup``, with the tree cut to ``--budget`` positions outside lookup streaks (0: no
cap). Prints acceptance, the draft's cost per step and the speed-up over the teacher alone (timed
right before each speculative decode of the same prompt); every output is checked against the
teacher's own.

    .venv/bin/python bench/draft_head.py --draft RUN/stages/draft [--sizes 4096 8192] [--k 2 3 4] \
        [--width 1 2] [--lookup 0 3] [--budget 0 3] [--repeats 3] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimforge.eval.speculative import DraftHead, greedy_decode, speculative_decode, token_counts  # noqa: E402
from slimforge.models import asset_model_folder  # noqa: E402


def answers(entry: Path) -> dict[int, str]:
    """Every generated answer in a ``teacher_generated`` cache entry, by sample index."""
    out = {}
    for batch in sorted(entry.glob("batch-*.json")):
        for r in json.loads(batch.read_text())["records"]:
            out[int(r["index"])] = r["prompt"] + "\n" + r["response"]
    return out


def held_prompts(tok, texts: list[str], count: int, length: int) -> list[torch.Tensor]:
    """The first ``length`` tokens [1, length] of the first ``count`` of ``texts`` that are that long."""
    prompts = []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] >= length:
            prompts.append(ids[:, :length])
        if len(prompts) == count:
            break
    return prompts


def teacher_alone(teacher, prompts: list[torch.Tensor], new_tokens: int, eos: int | None) -> tuple[list[list[int]], float]:
    """The teacher's own greedy continuations of ``prompts`` (after a warm-up) and their total seconds."""
    greedy_decode(teacher, prompts[0], 4, eos)
    refs, alone = [], 0.0
    for p in prompts:
        tokens, seconds = greedy_decode(teacher, p, new_tokens, eos)
        refs.append(tokens)
        alone += seconds
    return refs, alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draft", type=Path, required=True)
    parser.add_argument("--entry", type=Path, default=None, help="a teacher_generated cache entry (default: the "
                        "largest in the slimforge cache)")
    parser.add_argument("--trained", type=int, default=256, help="the draft trained on answers [0, trained): "
                        "token frequencies come from them, prompts from the answers after them")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 3, 4])
    parser.add_argument("--width", type=int, nargs="+", default=[1], help="the draft's candidates for the first "
                        "position (1: a plain chain; more: a draft tree with its runner-ups)")
    parser.add_argument("--lookup", type=int, nargs="+", default=[0], help="the longest n-gram a context lookup "
                        "matches (0: no lookup)")
    parser.add_argument("--budget", type=int, nargs="+", default=[0], help="cap a round's tree at this many "
                        "positions by cutting the lookup's branch, except after a lookup streak (0: no cap)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="time each setting this many times; the median "
                        "speed-up is printed, with the range")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimforge.assets import cache_root

    entry = args.entry or max((p for p in (cache_root() / "generated").iterdir() if p.is_dir()),
                              key=lambda p: len(list(p.glob("batch-*.json"))))
    folder = asset_model_folder("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    texts = answers(entry)
    train = [t for i, t in texts.items() if i < args.trained]
    held = [t for i, t in sorted(texts.items()) if i >= args.trained]
    prompts = held_prompts(tok, held, args.prompts, args.prompt_tokens)
    counts = token_counts(torch.cat([tok(t, return_tensors="pt")["input_ids"][0] for t in train]), teacher.config.vocab_size)
    eos = tok.eos_token_id
    heads = {"full": None, **{str(n): DraftHead.frequent(draft, counts, n, (eos,)) for n in args.sizes}}
    refs, alone = teacher_alone(teacher, prompts, args.new_tokens, eos)
    emitted = sum(len(r) for r in refs)
    step = alone / emitted
    print(f"teacher alone: {emitted / alone:.1f} tok/s ({1000 * step:.1f} ms a token), {len(prompts)} prompts "
          f"(answers never trained on) from {entry}, draft {args.draft}")
    print(f"{'head':>6} {'k':>2} {'w':>2} {'n':>2} {'b':>2} {'accept':>7} {'a/pos':>6} {'tok/round':>9} {'draft cost':>10} {'speed-up':>8} {'identical':>9} "
          f"{'coverage':>8} {'lookup':>7}")
    for name, head in heads.items():
        d_s = d_n = 0.0
        for p in prompts:
            tokens, seconds = greedy_decode(draft, p, args.new_tokens, eos, head)
            d_s, d_n = d_s + seconds, d_n + len(tokens)
        cost = d_s / d_n / step
        cover = 1.0 if head is None else sum(int(torch.isin(torch.tensor(r), head.token_ids).sum()) for r in refs) / emitted
        for k, width, lookup, budget in [(k, w, n, b) for k in args.k for w in args.width for n in args.lookup
                                         for b in args.budget]:
            same, acc, drafted, rounds, cut, looked = 0, 0, 0, 0, 0, 0
            ratios = []
            for _ in range(args.repeats):
                spec = paired_alone = 0.0
                for p, ref in zip(prompts, refs, strict=True):
                    # The baseline again right before each speculative decode of the same prompt: the
                    # ratio pairs them in time, so a drift in the machine's speed cancels.
                    paired_alone += greedy_decode(teacher, p, args.new_tokens, eos)[1]
                    start = time.perf_counter()
                    tokens, stats = speculative_decode(teacher, draft, p, args.new_tokens, k, eos, head, width, lookup,
                                                       budget or None)
                    spec += time.perf_counter() - start
                    same += tokens == ref
                    acc, drafted, rounds = acc + stats.accepted, drafted + stats.drafted, rounds + stats.rounds
                    cut += stats.rejections
                    looked += stats.lookup_accepts
                ratios.append(paired_alone / spec)
            ratios.sort()
            spread = f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else ""
            print(f"{name:>6} {k:>2} {width:>2} {lookup:>2} {budget:>2} {acc / max(drafted, 1):7.3f} {acc / max(acc + cut, 1):6.3f} "
                  f"{args.repeats * emitted / rounds:9.2f} {cost:10.3f} {ratios[len(ratios) // 2]:7.2f}x{spread} "
                  f"{same}/{args.repeats * len(prompts):<7} {cover:8.3f} {looked / rounds:7.3f}")
    print("(baseline: the teacher alone, this run, timed right before each speculative decode of the same prompt)")


if __name__ == "__main__":
    main()
