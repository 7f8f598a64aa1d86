"""Schemas of the eval task types."""

from __future__ import annotations

from dataclasses import dataclass

from slimforge.config import TaskConfig, check_choice, check_int


@dataclass
class PerplexityTaskConfig(TaskConfig):
    """Token perplexity over the first ``max_blocks`` packed blocks of a split."""

    type: str = "perplexity"
    split: str = "heldout"
    max_blocks: int | None = 64

    def check(self) -> None:
        check_choice("split", self.split, ("heldout", "train"))
        check_int("max_blocks", self.max_blocks, low=1)
