"""Prompts for teacher-generated data: the shipped prompt sets, user prompt files, and seeded draws.

The ``general`` set crosses everyday topics (science, nature, history, health, food, travel,
money, technology, arts, sports, daily life) with task templates (explain, define, tell a story,
give steps, compare, list benefits and drawbacks, write a letter, a poem, a dialogue, quiz
questions...). Both lists were written for slimforge; none of it comes from a benchmark. A
prompt is a string, or a chat ``messages`` list from a user's jsonl file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimforge.errors import DataError
from slimforge.textfiles import jsonl_rows, not_utf8_error

PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def is_prompt_file(prompts: str) -> bool:
    """Whether ``data.generate.prompts`` names a file (else it names a shipped prompt set)."""
    return prompts.lower().endswith(PROMPT_FILE_SUFFIXES) or "/" in prompts or "\\" in prompts


Prompt = str | list[dict[str, str]]

TOPICS = (
    # science
    "photosynthesis", "the water cycle", "black holes", "magnetism", "the periodic table", "static electricity",
    "how rainbows form", "the speed of sound",
    # nature
    "honeybees", "coral reefs", "migrating birds", "volcanoes", "rainforests", "mushrooms and fungi",
    "the changing seasons", "octopuses",
    # history
    "the printing press", "ancient Egypt", "the invention of the telephone", "the Silk Road",
    "the first moon landing", "medieval castles", "the Industrial Revolution", "the history of writing",
    # health
    "getting enough sleep", "drinking enough water", "stretching before exercise", "how vaccines work",
    "keeping teeth healthy", "managing everyday stress",
    # food and cooking
    "baking bread at home", "fermented foods", "cooking rice well", "planning a week of meals",
    "spices from around the world", "growing herbs on a windowsill",
    # travel and places
    "packing light for a trip", "travelling by train", "visiting a big city for the first time",
    "learning a few words before a trip abroad", "deserts", "islands",
    # money
    "making a monthly budget", "compound interest", "saving for an emergency fund", "comparing prices when shopping",
    "how banks work", "paying off debt",
    # technology and programming
    "how the internet works", "strong passwords", "learning to program in Python", "recursion in programming",
    "version control with git", "spreadsheets", "how search engines work", "sorting algorithms",
    # arts and culture
    "jazz music", "watercolour painting", "public libraries", "writing poetry", "museums", "photography",
    # sports and hobbies
    "chess", "marathon running", "team sports", "gardening", "knitting", "bird watching",
    # everyday life
    "keeping a tidy home", "recycling", "being a good neighbour", "learning a new language", "time management",
    "writing a thank-you note",
)

TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Explain {topic} to a curious ten-year-old.",
    "What is meant by {topic}? Give a short definition and one example.",
    "Write a short story in which {topic} plays an important part.",
    "Describe, step by step, how a beginner could learn more about {topic}.",
    "What are three common misconceptions about {topic}?",
    "Summarise the most important facts about {topic} in one paragraph.",
    "Write a friendly letter to a friend about something interesting you learned about {topic}.",
    "List some benefits and some drawbacks or risks connected with {topic}.",
    "Compare {topic} with something similar, and explain how they differ.",
    "Write a short poem about {topic}.",
    "A student asks: why does {topic} matter? Answer them clearly.",
    "Write five quiz questions about {topic}, each with its answer.",
    "Someone says that {topic} is overrated. Sum up their claim and give a balanced reply.",
    "Give a brief history of {topic}.",
    "Give three practical tips related to {topic}.",
    "Write a short dialogue between two friends talking about {topic}.",
    "Write an encyclopedia-style entry about {topic}.",
    "What should a complete beginner know about {topic}?",
    "Write a short news report about a new discovery connected with {topic}.",
    "Explain how {topic} connects to everyday life, with two examples.",
    "Write the opening paragraph of a blog post about {topic}.",
    "Suggest a fun weekend activity for a family that involves {topic}.",
    "Make up an analogy that helps explain {topic}, then explain the analogy.",
)


def general_prompts() -> list[str]:
    """Every topic with every template, in a fixed order (topics outer, templates inner)."""
    return [template.format(topic=topic) for topic in TOPICS for template in TEMPLATES]


PROMPT_SETS = {"general": general_prompts}


def prompt_set(name: str) -> list[str]:
    """A shipped prompt set by name.

    Raises:
        DataError: no such set.
    """
    if name not in PROMPT_SETS:
        raise DataError(f"no shipped prompt set {name!r}; choose one of {', '.join(PROMPT_SETS)} or give a file")
    return PROMPT_SETS[name]()


def _file_prompt(row: Any, where: str) -> Prompt:
    """A jsonl row's prompt: its ``prompt`` string, or its ``messages`` without trailing assistant turns."""
    if isinstance(row, dict) and isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return row["prompt"]
    messages = row.get("messages") if isinstance(row, dict) else None
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                          and isinstance(m.get("content"), str) for m in messages):
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if messages:
            return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise DataError(f"{where}: a prompt row needs a non-empty 'prompt' string or a 'messages' list of "
                    "{role, content} with a turn before any answer; fix the row")


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """Prompts from a ``.txt`` file (one per non-blank line) or ``.jsonl`` rows (``prompt`` or ``messages``).

    Raises:
        DataError: the file is missing, not UTF-8, malformed or holds no prompt.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist; fix data.generate.prompts or use a shipped set "
                        f"({', '.join(PROMPT_SETS)})")
    if path.suffix.lower() == ".txt":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise not_utf8_error(str(path), err.start, err.reason) from None
        prompts: list[Prompt] = [line.strip() for line in lines if line.strip()]
    else:
        prompts = [_file_prompt(row, f"{name}:{lineno}") for name, lineno, row in jsonl_rows([str(path)])]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts; add one per line (.txt) or rows with a "
                        "'prompt' or 'messages' field (.jsonl)")
    return prompts


def load_prompts(source: str) -> list[Prompt]:
    """The prompts ``data.generate.prompts`` names: a shipped set or a file."""
    return read_prompt_file(source) if is_prompt_file(source) else list(prompt_set(source))


def draw_prompts(pool: list[Prompt], start: int, stop: int, seed: int) -> list[Prompt]:
    """Prompts ``start .. stop - 1`` of an endless seeded sequence over ``pool``.

    The sequence goes through ``pool`` in a seeded order, then again in another, and so on;
    prompt ``i`` never depends on how many are drawn, so a corpus can grow and keep its start.
    """
    import numpy as np

    size = len(pool)
    orders: dict[int, list[int]] = {}
    out = []
    for index in range(start, stop):
        epoch, offset = divmod(index, size)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, 0x70726F, epoch]).permutation(size).tolist()
        out.append(pool[orders[epoch][offset]])
    return out
