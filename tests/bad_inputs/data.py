"""Bad training and evaluation text: each names the file (and line) and what it must be."""

from __future__ import annotations

import json
import shutil

from bad_inputs.harness import BadInput, Env

GOOD_CHAT = {"messages": [{"role": "user", "content": "Who wrote it?"}, {"role": "assistant", "content": "He did."}]}


def _corpus_with(name: str, content: bytes):
    """The tiny corpus plus one file that is not UTF-8 text."""
    def build(env: Env):
        folder = shutil.copytree(env.corpus_dir, env.tmp / "corpus")
        (folder / name).write_bytes(content)
        return folder
    return build


LATIN1 = ("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e " * 40).encode("latin-1")
BINARY = bytes(range(256)) * 16


def run_on(make):
    def build(env: Env) -> list[str]:
        argv = env.tiny_run(env.tmp / "run")
        return [a if not a.startswith("data.path=") else f"data.path={make(env)}" for a in argv]
    return build


def eval_on(make):
    def build(env: Env) -> list[str]:
        return ["eval", "--teacher", str(env.teacher_dir), "--students", str(env.teacher_dir), "--tasks", "perplexity",
                "--data", str(make(env)), "--block-size", "32", "--out", str(env.tmp / "ev")]
    return build


def _chat_with(content):
    """A chat file whose 6th row gives one message's content another type than the rows before."""
    def build(env: Env):
        odd = {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": "Yes."}]}
        path = env.tmp / "chat.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in [GOOD_CHAT] * 5 + [odd] + [GOOD_CHAT] * 5) + "\n")
        return path
    return build


def _latin1_jsonl(env: Env):
    path = env.tmp / "rows.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + b'{"text": "caf\xe9"}\n')
    return path


NOT_UTF8 = r"/corpus/zz_notes\.txt is not UTF-8 text \(byte \d+: .+\); data files must be UTF-8: re-encode it"
MIXED = (r"/chat\.jsonl:6: a field here has another type than elsewhere in the data \(.+\); give each field "
         r"one type throughout, e\.g\. every message's content a string$")

CASES = [
    BadInput("latin1-text-file", run_on(_corpus_with("zz_notes.txt", LATIN1)), NOT_UTF8),
    BadInput("binary-text-file", run_on(_corpus_with("zz_notes.txt", BINARY)), NOT_UTF8),
    BadInput("latin1-eval-data", eval_on(_corpus_with("zz_notes.txt", LATIN1)), NOT_UTF8),
    BadInput("latin1-jsonl", run_on(_latin1_jsonl), r"/rows\.jsonl is not UTF-8 text \(byte 30: "),
    BadInput("chat-content-list-and-text", run_on(_chat_with([{"type": "text", "text": "hi"}])), MIXED),
    BadInput("chat-content-number-and-text", run_on(_chat_with(7)), MIXED),
]
