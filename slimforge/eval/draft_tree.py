"""A speculative round's proposals as a tree, a context lookup that adds to it, and what a teacher needs to verify one.

Pure structures (no model runs here): :mod:`slimforge.eval.speculative` drafts, verifies and keeps
the caches; the eval config checks a teacher's config against :func:`check_tree_attention` before
any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

# How many tokens a context lookup's proposal may grow past the draft's chain while it keeps being taken,
# and by how many it grows for each round in a row whose accepted path ran to the end of its branch.
LOOKUP_STREAK_MAX = 8
LOOKUP_STREAK_STEP = 2



@dataclass
class DraftTree:
    """A round's proposals as a tree under the last emitted token (node 0).

    Nodes ``1..len(chain)`` are the draft's greedy chain (each the child of the one before); the
    ``siblings`` that follow are its runner-up candidates for the first position (children of node 0);
    ``extra`` nodes, ``(parent, token)``, come last (a context lookup's branch, :meth:`attach`). With
    neither, the tree is the plain chain of Leviathan et al. Each node attends to the cache and its
    own ancestors only (:meth:`attention_mask`), at its depth's position, so the teacher scores every
    path in one pass as if it had read that path alone.
    """

    last: int
    chain: list[int]
    siblings: list[int] = field(default_factory=list)
    extra: list[tuple[int, int]] = field(default_factory=list)

    @property
    def tokens(self) -> list[int]:
        return [self.last, *self.chain, *self.siblings, *(token for _, token in self.extra)]

    @property
    def parents(self) -> list[int]:
        return [-1, *range(len(self.chain)), *([0] * len(self.siblings)), *(parent for parent, _ in self.extra)]

    @property
    def is_chain(self) -> bool:
        return not self.siblings and not self.extra

    def depths(self) -> list[int]:
        depths: list[int] = []
        for parent in self.parents:  # a parent always comes before its children
            depths.append(0 if parent < 0 else depths[parent] + 1)
        return depths

    def children(self, node: int) -> dict[int, int]:
        """``{token: node}`` of ``node``'s children."""
        tokens = self.tokens
        return {tokens[n]: n for n, parent in enumerate(self.parents) if parent == node}

    def attach(self, continuation: list[int]) -> list[int]:
        """Add ``continuation`` (tokens after node 0) where it leaves the tree: down the nodes it agrees
        with, then the rest of it as a new branch. Returns the new nodes ([] when the tree already holds
        the whole continuation)."""
        node = 0
        for at, token in enumerate(continuation):
            child = self.children(node).get(token)
            if child is None:
                added = []
                for rest in continuation[at:]:
                    self.extra.append((node, rest))
                    node = len(self.tokens) - 1
                    added.append(node)
                return added
            node = child
        return []

    def cut(self, count: int) -> None:
        """Remove the last ``count`` extra nodes (the end of the branch :meth:`attach` added last: nothing
        hangs from them)."""
        if count > 0:
            del self.extra[-count:]

    def attention_mask(self, past: int, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """An additive mask [1, 1, nodes, past + nodes]: 0 where a node may attend (the cache, itself and
        its ancestors), the dtype's minimum elsewhere (eager and SDPA attention both read it as given)."""
        parents = self.parents
        n = len(parents)
        allowed = torch.zeros(n, past + n, dtype=torch.bool, device=device)
        allowed[:, :past] = True
        for node in range(n):
            up = node
            while up >= 0:
                allowed[node, past + up] = True
                up = parents[up]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


class ContextLookup:
    """Prompt lookup (Saxena 2023): what followed the latest earlier occurrence of the context's last n-gram.

    Every n-gram of the context up to ``max_n`` tokens is indexed by where its continuation starts, as
    tokens arrive; :meth:`propose` tries the longest suffix first. It costs no model at all, and pays
    where the output repeats its prompt or itself.
    """

    def __init__(self, tokens: list[int], max_n: int) -> None:
        self.tokens: list[int] = []
        self.max_n = max_n
        self.latest: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            at = len(self.tokens) - 1  # the continuation of the n-grams that end just before it
            for n in range(1, min(self.max_n, at) + 1):
                self.latest[tuple(self.tokens[at - n:at])] = at

    def propose(self, length: int) -> list[int]:
        """``length`` tokens that followed the longest suffix seen before; [] when none was.

        Where that continuation runs into the suffix itself (a repeating pattern, e.g. one token over and
        over), it goes on with its own tokens: the pattern, continued.
        """
        for n in range(min(self.max_n, len(self.tokens)), 0, -1):
            at = self.latest.get(tuple(self.tokens[-n:]))
            if at is not None:
                out = self.tokens[at:at + length]
                while len(out) < length:
                    out.append(out[len(out) - (len(self.tokens) - at)])
                return out
        return []


def position_budget(costs: list[float], tolerance: float = 0.15) -> int | None:
    """How many positions a round's verification may hold before the pass gets expensive.

    ``costs[i]`` is the teacher's decoder pass over ``i + 1`` new positions (any unit; at least two).
    Every round reads two (the last token and a draft), so the budget is the largest ``n`` for which
    the passes over 2..n positions all cost within ``1 + tolerance`` of the 2-position pass. ``None``
    when every measured size is (no cap is needed where positions are nearly free, as on a GPU).
    On a 2-core CPU the pass jumps at 4 positions (33 -> 40 ms for SmolLM2-135M), so the budget is 3.
    """
    if len(costs) < 2:
        raise ValueError("a position budget needs the pass's cost at 1 and 2 positions at least")
    limit = costs[1] * (1 + tolerance)
    for n in range(3, len(costs) + 1):
        if costs[n - 1] > limit:
            return n - 1
    return None


def tree_positions(prompt_tokens: int, new_tokens: int, k: int, width: int, lookup: int) -> int:
    """An upper bound on the positions a decode's KV cache holds: the prompt, the new tokens and one
    round's tree (the chain, the runner-ups, and a lookup branch at its longest)."""
    return prompt_tokens + new_tokens + k + width + (1 + LOOKUP_STREAK_MAX if lookup else 0)


def check_tree_attention(config: Any, length: int) -> None:
    """Raise ``ValueError`` unless a teacher of ``config`` can verify a draft tree over ``length`` positions.

    The tree's ancestor mask is read as given by eager and SDPA attention; a sliding window shorter
    than the sequence would need that window in the mask as well, so it is refused.
    """
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"verifying a draft tree needs eager or sdpa attention, the teacher runs {implementation!r}; "
                         "load it with attn_implementation='sdpa' or set width: 1 and lookup: 0")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or ()
    slides = window is not None and (not layer_types or "sliding_attention" in layer_types)
    if slides and window < length:
        raise ValueError(f"verifying a draft tree needs full attention, and the teacher's sliding window ({window} tokens) "
                         f"is shorter than the decode's {length} positions (prompt, new tokens, one round's drafts); set width: 1 "
                         "and lookup: 0, or shorten the decode")
