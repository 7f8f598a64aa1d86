"""Bad settings for teacher-generated data: each fails in one line before the teacher writes anything."""

from __future__ import annotations

import json

from bad_inputs.harness import TINY, BadInput, Env


def generated_run(*extra: str, prompts=None):
    """``slimforge run`` of the tiny recipe on teacher-generated data; ``prompts(env)`` may write a prompt file."""
    def build(env: Env) -> list[str]:
        given = [f"data.generate.prompts={prompts(env)}"] if prompts is not None else []
        return ["run", TINY, f"teacher.path={env.teacher_dir}", "data=teacher_generated", "data.block_size=32",
                "data.generate.num_samples=4", "data.generate.max_new_tokens=4", "stages.student.num_layers=2",
                f"run_dir={env.tmp / 'run'}", *given, *extra]
    return build


def _missing(env: Env):
    return env.tmp / "nope.txt"


def _empty(env: Env):
    path = env.tmp / "empty.txt"
    path.write_text("\n   \n")
    return path


def _chat_prompts(env: Env):
    path = env.tmp / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello?"}]}) + "\n")
    return path


CASES = [
    BadInput("missing-prompt-file", generated_run(prompts=_missing),
             r"prompt file .*/nope\.txt does not exist; fix data\.generate\.prompts or use a shipped set \(general\)$"),
    BadInput("empty-prompt-file", generated_run(prompts=_empty),
             r"prompt file .*/empty\.txt holds no prompts; add one per line"),
    BadInput("unknown-prompt-set", generated_run("data.generate.prompts=everyday"),
             r"invalid value data\.generate\.prompts='everyday': must be a shipped prompt set \(general\) or a "
             r"\.txt/\.jsonl/\.json file of prompts$"),
    BadInput("zero-temperature-sampling", generated_run("data.generate.temperature=0"),
             r"invalid value data\.generate\.temperature=0\.0: must be in \(0, 100\] when sampling; for greedy "
             r"answers set do_sample=false$"),
    BadInput("zero-new-tokens", generated_run("data.generate.max_new_tokens=0"),
             r"invalid value data\.generate\.max_new_tokens=0: must be between 1 and 1000000$"),
    BadInput("path-with-generated-data", generated_run("data.path=corpus.txt"),
             r"invalid value data\.path='corpus\.txt': must be unset with format teacher_generated"),
    BadInput("chat-prompts-without-template", generated_run("data.generate.chat_template=false", prompts=_chat_prompts),
             r"chat\.jsonl holds chat 'messages' prompts, which need the chat template; set "
             r"data\.generate\.chat_template to true or null"),
]
