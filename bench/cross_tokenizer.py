"""Cross-tokenizer distillation on the real SmolLM2-135M: what the teacher adds over plain CE for a student
with its own tokenizer.

One fresh student (the teacher's architecture at smaller sizes) gets a byte-level BPE of its own, trained
on the Shakespeare training split (``slimforge.distill.students.train_domain_tokenizer``, what the student
stage's ``tokenizer: domain_bpe`` does). From the same initial weights it trains for the same steps on the
same blocks (the Shakespeare training split in the student's tokens), by

- **ce**: the student's next-token cross-entropy alone (the baseline; the teacher never runs);
- **uld** / **hybrid**: the same CE plus the cross-tokenizer loss at character-aligned positions
  (``CrossTokenizerObjective``: the teacher re-reads each block's text in its own tokens).

Each is scored on held-out Shakespeare blocks (documents no training block holds) by its perplexity **per
character**: exp(total next-token CE in nats / characters predicted), so models with different tokenizers
compare; the teacher is scored on the very same characters, read in its own tokens. The ratio is
ppl_char(KD) / ppl_char(CE) from the same run (below 1: distillation helped).

    .venv/bin/python bench/cross_tokenizer.py [--quick] [--steps N] [--losses uld,hybrid]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from slimforge.config import DataConfig  # noqa: E402
from slimforge.data import blocks_tensor, build_data  # noqa: E402
from slimforge.distill.config import CrossTokenizerSpec, DistillConfig, FromConfigStudentConfig  # noqa: E402
from slimforge.distill.cross_objective import CrossTokenizerObjective, TeacherReader  # noqa: E402
from slimforge.distill.cross_vocab import SPECIAL_MARK, teacher_view  # noqa: E402
from slimforge.distill.students import train_domain_tokenizer, training_texts  # noqa: E402
from slimforge.distill.trainer import DistillTrainer  # noqa: E402
from slimforge.models import asset_model_folder, load_model  # noqa: E402

TEACHER = "smollm2-135m"
QUICK = {"steps": 12, "block_size": 128, "batch_size": 4, "vocab_size": 2048, "hidden_size": 192,
         "num_hidden_layers": 4, "intermediate_size": 512, "num_attention_heads": 3, "num_key_value_heads": 1,
         "eval_blocks": 8}
FULL = {"steps": 150, "block_size": 256, "batch_size": 8, "vocab_size": 4096, "hidden_size": 384,
        "num_hidden_layers": 8, "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 2,
        "eval_blocks": 32}


class CEOnly(CrossTokenizerObjective):
    """The baseline: the same objective with no teacher rows (nothing aligned) and no teacher run."""

    def teacher_targets(self, split, blocks, ids):
        rows = ids.shape[0] * (ids.shape[1] - 1)
        return {"top_ids": torch.zeros(rows, self.top_k, dtype=torch.long, device=ids.device),
                "top_logp": torch.full((rows, self.top_k + 1), -torch.inf, device=ids.device)}

    def heldout_metrics(self, student, heldout, blocks, batch_size, device):
        return {}


def chars_of(raw: bytes) -> int:
    return sum(1 for byte in raw if (byte & 0xC0) != 0x80)


@torch.no_grad()
def student_ppl_per_char(model, blocks: torch.Tensor, reader: TeacherReader) -> dict:
    """exp(CE nats / characters) over the predicted tokens of ``blocks`` (student ids)."""
    model.eval()
    counts = reader.char_counts(model.config.vocab_size)
    nats = chars = tokens = 0.0
    per_block = []  # nats per character of each block, for the paired comparison
    for row in blocks.split(4):
        logits = model(input_ids=row, use_cache=False).logits[:, :-1].float()
        targets = row[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        block_nats = ce.reshape(targets.shape).sum(-1)
        block_chars = counts[targets].sum(-1)
        per_block += (block_nats / block_chars.clamp_min(1)).tolist()
        nats += float(block_nats.sum())
        chars += float(block_chars.sum())
        tokens += targets.numel()
    return {"ppl_char": math.exp(nats / chars), "ppl_token": math.exp(nats / tokens), "chars": int(chars),
            "per_block": [round(x, 5) for x in per_block]}


@torch.no_grad()
def teacher_ppl_per_char(teacher, blocks: torch.Tensor, reader: TeacherReader) -> dict:
    """The teacher on the same characters: each student block's text in the teacher's tokens (one forward a block)."""
    nats = chars = 0.0
    for block in blocks.tolist():
        view = teacher_view(block, reader.student_bytes, reader.teacher_tokenizer)
        ids = torch.tensor([view.teacher_ids])
        logits = teacher(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nats += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        pieces = reader.teacher_tokenizer.convert_ids_to_tokens(view.teacher_ids[1:])
        text = reader.teacher_tokenizer.convert_tokens_to_string(pieces)
        chars += len(text)
    return {"ppl_char": math.exp(nats / chars), "chars": int(chars)}


def train(kind: str, args, sizes, teacher, teacher_tok, student_tok, bundle, init_state, work: Path) -> dict:
    from transformers import AutoModelForCausalLM

    spec = CrossTokenizerSpec(loss="uld" if kind == "ce" else kind, weight=args.weight, top_k=args.top_k)
    cfg = DistillConfig(steps=sizes["steps"], batch_size=sizes["batch_size"], lr=args.lr,
                        warmup_steps=max(1, sizes["steps"] // 10), eval_every=10**6, eval_blocks=1,
                        checkpoint_every=10**6, precision="fp32", trackers=[], cross_tokenizer=spec)
    student = AutoModelForCausalLM.from_config(init_state["config"], dtype=torch.float32)
    student.load_state_dict(init_state["weights"])
    cls = CEOnly if kind == "ce" else CrossTokenizerObjective
    objective = cls(cfg, student_tok, teacher_tok, teacher=teacher, top_k=args.top_k)
    trainer = DistillTrainer(cfg, student, bundle, work / kind, None, seed=0, device=torch.device("cpu"),
                             teacher=teacher, objective=objective)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    held = blocks_tensor(bundle.heldout, sizes["eval_blocks"])
    score = student_ppl_per_char(result.model, held, objective.reader)
    return {"kind": kind, **score, "train_seconds": round(seconds, 1), "final_loss": result.losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small student, few steps: a smoke run of minutes")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each run (default: the mode's)")
    parser.add_argument("--losses", default="uld", help="comma-separated cross-tokenizer losses to run (uld, hybrid)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight", type=float, default=1.0, help="cross_tokenizer.weight")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=None, help="held-out blocks scored (default: the mode's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    sizes = dict(QUICK if args.quick else FULL)
    if args.steps:
        sizes["steps"] = args.steps
    if args.eval_blocks:
        sizes["eval_blocks"] = args.eval_blocks

    teacher, teacher_tok = load_model(str(asset_model_folder(TEACHER)), dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    work = Path(tempfile.mkdtemp(prefix="xtok-bench-"))
    data = DataConfig(asset="shakespeare", block_size=sizes["block_size"])
    started = time.perf_counter()
    texts = training_texts(build_data(data, teacher_tok), teacher_tok)
    student_tok = train_domain_tokenizer(texts, sizes["vocab_size"], teacher_tok)
    tokenizer_seconds = time.perf_counter() - started
    bundle = build_data(data, student_tok)
    student_cfg = FromConfigStudentConfig(**{k: sizes[k] for k in ("hidden_size", "num_hidden_layers",
                                                                    "intermediate_size", "num_attention_heads",
                                                                    "num_key_value_heads")},
                                          tokenizer="domain_bpe", vocab_size=len(student_tok))
    config = student_cfg.student_config(teacher.config)
    config.vocab_size = len(student_tok)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(config, name, None) is not None:
            setattr(config, name, getattr(student_tok, name))
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    init = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    init_state = {"config": config, "weights": {k: v.clone() for k, v in init.state_dict().items()}}
    params = sum(p.numel() for p in init.parameters())
    reader = TeacherReader(student_tok, teacher_tok, args.top_k)
    held = blocks_tensor(bundle.heldout, sizes["eval_blocks"])
    probe = held[0].tolist()
    view = teacher_view(probe, reader.student_bytes, teacher_tok)
    header = {"mode": "quick" if args.quick else "full", **sizes, "student_vocab": len(student_tok),
              "teacher_vocab": len(teacher_tok), "student_parameters": params, "lr": args.lr,
              "weight": args.weight, "top_k": args.top_k, "train_blocks": len(bundle.train),
              "heldout_blocks_scored": len(held), "aligned_fraction_first_block": round(len(view.student_positions) /
                                                                                         (len(probe) - 1), 3),
              "tokenizer_seconds": round(tokenizer_seconds, 1),
              "special_tokens": sum(1 for raw in reader.student_bytes.values() if raw.startswith(SPECIAL_MARK))}
    print(json.dumps(header), flush=True)
    rows = [{"kind": "teacher", **teacher_ppl_per_char(teacher, held, reader)}]
    start_score = student_ppl_per_char(init, held, reader)
    rows.append({"kind": "init", **start_score})
    for kind in ["ce", *[k.strip() for k in args.losses.split(",") if k.strip()]]:
        rows.append(train(kind, args, sizes, teacher, teacher_tok, student_tok, bundle, init_state, work))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "per_block"}), flush=True)
    base_row = next(r for r in rows if r["kind"] == "ce")
    base = base_row["ppl_char"]
    for row in rows:
        if row["kind"] not in ("teacher", "init", "ce"):  # paired, block by block: how often KD beats CE
            pairs = list(zip(row["per_block"], base_row["per_block"]))
            row["blocks_better_than_ce"] = f"{sum(a < b for a, b in pairs)}/{len(pairs)}"
            print(f"{row['kind']}: lower CE per character than the CE baseline on {row['blocks_better_than_ce']} "
                  "held-out blocks", flush=True)
    print(f"\n{'model':10} {'ppl/char':>9} {'ppl/token':>10} {'vs CE':>7} {'train s':>8}")
    for row in rows:
        ratio = f"{row['ppl_char'] / base:7.3f}" if row["kind"] not in ("teacher", "init") else "      –"
        token = f"{row['ppl_token']:10.2f}" if "ppl_token" in row else "         –"
        seconds = f"{row['train_seconds']:8.1f}" if "train_seconds" in row else "       –"
        print(f"{row['kind']:10} {row['ppl_char']:9.3f} {token} {ratio} {seconds}")
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
