"""A feature-level draft (EAGLE-1 style) for the embedded teacher: does it reach the speculative targets
where a plain 2-layer draft does not? A prototype to decide whether slimforge should ship one.

A plain draft predicts the teacher's next tokens from the tokens alone. A feature draft also reads the
teacher's own last hidden state, which every verification computes anyway (Li et al. 2024, "EAGLE:
Speculative Sampling Requires Rethinking Feature Uncertainty"): one decoder layer of the teacher's family
takes ``fc([embed(x[t+1]), f[t]])`` and predicts the teacher's feature ``f[t+1]``; the teacher's own
(frozen) output projection turns it into a token. Drafting a second token feeds the predicted feature back.

Here: the draft's layer starts as a copy of the teacher's last layer and its norm as the teacher's final
norm; ``fc`` starts as [0 | I] (the feature passes through). It trains on the teacher's features of the
cached ``teacher_generated`` answers ``[0, --trained)`` (features computed once), with a smooth-L1 loss on
the feature plus ``--kl-weight`` x the forward KL of its tokens to the teacher's, and Gaussian noise on the
input features (EAGLE's defence against its own drafting errors). The decode is this script's own chain
verify loop, the same contract as ``slimforge.eval.speculative``: the output must be the teacher's greedy
output token for token. Prompts: the first ``--prompt-tokens`` of answers ``[--trained, ...)``, never
trained on; the baseline is the teacher alone in the same run, fp32.

    .venv/bin/python bench/feature_draft.py [--trained 1280] [--steps 300] [--k 1 2 3 4] [--vocab 4096]
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from draft_head import answers, held_prompts, teacher_alone  # noqa: E402  (bench/ is the script's own folder)

from slimforge.eval.speculative import DraftHead, token_counts  # noqa: E402
from slimforge.models import asset_model_folder  # noqa: E402


class FeatureDraft(nn.Module):
    """One decoder layer of the teacher's family over ``fc([embed(token), feature])``; outputs features."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        from transformers import AutoModel

        config = copy.deepcopy(teacher.config)
        config.num_hidden_layers = 1
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[-1:]
        self.body = AutoModel.from_config(config)
        self.body.embed_tokens = None  # inputs come as embeddings: no second vocabulary table
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, hidden:] = torch.eye(hidden)
            self.body.layers[0].load_state_dict(teacher.get_decoder().layers[-1].state_dict())
            self.body.norm.load_state_dict(teacher.get_decoder().norm.state_dict())
        self.embed = [teacher.get_input_embeddings()]  # a list: the teacher's, frozen, not this module's
        self.to(next(teacher.parameters()).dtype)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        x = self.fc(torch.cat([self.embed[0](tokens), features], dim=-1))
        return self.body(inputs_embeds=x, past_key_values=cache, use_cache=cache is not None).last_hidden_state


def pack(tok, texts: list[str], block: int) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


@torch.no_grad()
def teacher_features(teacher, blocks: torch.Tensor, batch: int = 8) -> torch.Tensor:
    return torch.cat([teacher.get_decoder()(input_ids=blocks[i:i + batch]).last_hidden_state
                      for i in range(0, len(blocks), batch)])


def train(draft: FeatureDraft, head: nn.Module, blocks: torch.Tensor, feats: torch.Tensor, steps: int, batch: int,
          lr: float, kl_weight: float, noise: float, seed: int = 0) -> list[float]:
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    losses = []
    draft.train()
    scale = float(feats.std())
    for step in range(steps):
        rows = torch.randint(0, len(blocks), (batch,), generator=g)
        ids, f = blocks[rows], feats[rows]
        inp = f[:, :-1] + noise * scale * torch.randn(f[:, :-1].shape, generator=g)
        pred = draft(inp, ids[:, 1:])
        target = f[:, 1:]
        reg = F.smooth_l1_loss(pred, target)
        with torch.no_grad():
            t_logp = F.log_softmax(head(target).float(), -1)
        s_logp = F.log_softmax(head(pred).float(), -1)
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
        loss = reg + kl_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step % 25 == 0 or step == steps - 1:
            top1 = float((t_logp.argmax(-1) == s_logp.argmax(-1)).float().mean())
            print(f"step {step:4d} loss {float(loss):.4f} (reg {float(reg):.4f}, kl {float(kl):.4f}) "
                  f"train top-1 {top1:.3f}", flush=True)
    draft.eval()
    return losses


@torch.no_grad()
def heldout_top1(draft, head, blocks, feats, batch: int = 8) -> float:
    """Teacher-forced: how often the draft's next-next token (from the true feature) is the teacher's."""
    hits = total = 0
    for i in range(0, len(blocks), batch):
        ids, f = blocks[i:i + batch], feats[i:i + batch]
        pred = draft(f[:, :-1], ids[:, 1:])
        hits += int((head(pred).argmax(-1) == head(f[:, 1:]).argmax(-1)).sum())
        total += pred.shape[0] * pred.shape[1]
    return hits / total


def _pick(head: nn.Module, sub: DraftHead | None, feature: torch.Tensor) -> int:
    if sub is None:
        return int(head(feature).argmax())
    return int(sub.token_ids[int((sub.weight @ feature).argmax())])


@torch.no_grad()
def feature_speculative(teacher, draft: FeatureDraft, prompt: torch.Tensor, max_new: int, k: int,
                        sub: DraftHead | None = None, eos: int | None = None) -> tuple[list[int], dict]:
    """The teacher's greedy continuation of ``prompt`` [1, m], drafted ``k`` tokens a round by ``draft``."""
    from transformers import DynamicCache

    dec, head = teacher.get_decoder(), teacher.get_output_embeddings()
    t_cache, d_cache = DynamicCache(), DynamicCache()
    hidden = dec(input_ids=prompt, past_key_values=t_cache, use_cache=True).last_hidden_state[0]
    out = [int(head(hidden[-1:]).argmax())]
    if prompt.shape[1] > 1:  # the draft's pairs (f[j], x[j+1]) for the prompt
        draft(hidden[None, :-1], prompt[:, 1:], d_cache)
    pend_f, pend_x = hidden[-1:], [out[0]]
    stats = {"rounds": 0, "drafted": 0, "accepted": 0, "rejections": 0}
    while len(out) < max_new and out[-1] != eos:
        steps = min(k, max_new - len(out) - 1)
        drafted: list[int] = []
        if steps > 0:
            f = draft(pend_f[None], torch.tensor([pend_x]), d_cache)[0, -1]
            for i in range(steps):
                drafted.append(_pick(head, sub, f))
                if i < steps - 1:
                    f = draft(f[None, None], torch.tensor([[drafted[-1]]]), d_cache)[0, -1]
            if steps > 1:
                d_cache.crop(-(steps - 1))  # the entries made from the draft's own features
        hv = dec(input_ids=torch.tensor([[out[-1], *drafted]]), past_key_values=t_cache,
                 use_cache=True).last_hidden_state[0]
        a = 0
        while a < len(drafted) and int(head(hv[a:a + 1]).argmax()) == drafted[a]:
            a += 1
        choice = int(head(hv[a:a + 1]).argmax())
        if len(drafted) > a:
            t_cache.crop(-(len(drafted) - a))
        stats["rounds"] += 1
        stats["drafted"] += len(drafted)
        stats["accepted"] += a
        stats["rejections"] += a < len(drafted)
        new = drafted[:a] + [choice]
        if steps > 0:
            pend_f, pend_x = hv[: a + 1], new
        else:  # nothing drafted: the pending pairs were not fed
            pend_f, pend_x = torch.cat([pend_f, hv[:1]]), pend_x + new
        for t in new:
            out.append(t)
            if t == eos or len(out) == max_new:
                return out, stats
    return out, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entry", type=Path, default=None)
    parser.add_argument("--trained", type=int, default=1280)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=0.1)
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--vocab", type=int, default=4096, help="draft head over this many frequent tokens (0: full)")
    parser.add_argument("--max-blocks", type=int, default=None, help="train on at most this many blocks (smoke runs)")
    parser.add_argument("--save", type=Path, default=None)
    parser.add_argument("--load", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimforge.assets import cache_root

    entry = args.entry or max((p for p in (cache_root() / "generated").iterdir() if p.is_dir()),
                              key=lambda p: len(list(p.glob("batch-*.json"))))
    folder = asset_model_folder("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(folder)
    teacher = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
    head = teacher.get_output_embeddings()
    texts = answers(entry)
    train_texts = [t for i, t in sorted(texts.items()) if i < args.trained]
    held = [t for i, t in sorted(texts.items()) if i >= args.trained]
    blocks = pack(tok, train_texts, args.block)[: args.max_blocks]
    draft = FeatureDraft(teacher)
    n_params = sum(p.numel() for p in draft.parameters())
    print(f"{len(train_texts)} answers -> {len(blocks)} blocks of {args.block}; {len(held)} held-out answers; "
          f"draft {n_params:,} parameters (its layer, norm and fc; embeddings and head are the teacher's)")
    start = time.perf_counter()
    if args.load:
        draft.load_state_dict(torch.load(args.load, weights_only=True))
        feats = None
    else:
        feats = teacher_features(teacher, blocks)
        print(f"teacher features: {tuple(feats.shape)} in {time.perf_counter() - start:.0f} s", flush=True)
        start = time.perf_counter()
        if args.steps:
            train(draft, head, blocks, feats, args.steps, args.batch, args.lr, args.kl_weight, args.noise)
        print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
        if args.save:
            torch.save(draft.state_dict(), args.save)
    prompts = held_prompts(tok, held, args.prompts, args.prompt_tokens)
    if not prompts:
        print("no held-out answers to prompt with: generate more (a larger data.generate.num_samples), then --load")
        return
    held_blocks = pack(tok, held, args.block)
    if len(held_blocks):
        print(f"held-out teacher-forced top-1 (the next-next token from the true feature): "
              f"{heldout_top1(draft, head, held_blocks, teacher_features(teacher, held_blocks)):.3f} "
              f"on {held_blocks.numel()} tokens")
    counts = token_counts(blocks, teacher.config.vocab_size)
    eos = tok.eos_token_id
    sub = DraftHead.frequent(teacher, counts, args.vocab, (eos,)) if args.vocab else None
    refs, alone = teacher_alone(teacher, prompts, args.new_tokens, eos)
    emitted = sum(len(r) for r in refs)
    print(f"teacher alone: {emitted / alone:.1f} tok/s over {len(prompts)} prompts never trained on ({emitted} tokens)")
    print(f"{'k':>2} {'accept':>7} {'a/pos':>6} {'tok/round':>9} {'speed-up':>8} {'identical':>9}")
    for k in args.k:
        feature_speculative(teacher, draft, prompts[0], 4, k, sub, eos)
        start = time.perf_counter()
        same, tot = 0, {"rounds": 0, "drafted": 0, "accepted": 0, "rejections": 0}
        for p, ref in zip(prompts, refs, strict=True):
            t, st = feature_speculative(teacher, draft, p, args.new_tokens, k, sub, eos)
            same += t == ref
            for key in tot:
                tot[key] += st[key]
        spec = time.perf_counter() - start
        print(f"{k:>2} {tot['accepted'] / max(tot['drafted'], 1):7.3f} "
              f"{tot['accepted'] / max(tot['accepted'] + tot['rejections'], 1):6.3f} "
              f"{emitted / tot['rounds']:9.2f} {alone / spec:7.2f}x {same}/{len(prompts)}")
    print("(baseline: the teacher alone, this run, fp32)")


if __name__ == "__main__":
    main()
