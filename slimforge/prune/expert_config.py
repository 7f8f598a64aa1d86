"""Schema of expert pruning for mixture-of-experts models (no heavy imports: validation runs before torch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slimforge.config import FieldError, check_choice, check_fraction, check_int, named_settings
from slimforge.prune.choices import EXPERT_SCORES
from slimforge.prune.config import CalibrationConfig

if TYPE_CHECKING:  # pragma: no cover
    from slimforge.stage import TeacherInfo


@dataclass
class ExpertsConfig(CalibrationConfig):
    """Remove (or merge) the least salient routed experts of every MoE layer; the result is a smaller HF model.

    ``score``: ``reap`` (Lasby et al. 2025): an expert's mean, over the calibration tokens
    routed to it, of router gate weight x ``||expert output||_2``; ``frequency``: how many
    tokens chose it. Every layer keeps the same number of experts (a config holds one count):
    ``num_experts`` (experts kept per layer) or ``ratio`` (the fraction removed, rounded). The
    router's rows go with the experts. Layers are scored one at a time, each on the inputs the
    already-pruned layers before it produce.

    ``merge``: instead of dropping a removed expert, average it into the survivor whose output
    is most like its own on the tokens routed to it (mean cosine), weighted by how many
    calibration tokens each received; the survivor keeps its router row. ``top_k``: route each
    token to this many experts (after removal); PhiMoE's router always routes to 2.
    Qwen2-MoE's shared expert is never touched.
    """

    kind: str = "prune"
    method: str = "experts"
    score: str = "reap"
    num_experts: int | None = None
    ratio: float | None = None
    merge: bool = False
    top_k: int | None = None

    def check(self) -> None:
        super().check()
        check_choice("score", self.score, EXPERT_SCORES)
        if self.num_experts is not None and self.num_experts < 1:
            raise FieldError("num_experts", self.num_experts,
                             "every layer must keep at least one expert (and at least top-k)")
        if self.ratio is not None and self.ratio >= 1:
            raise FieldError("ratio", self.ratio, "would remove every expert of a layer; give a fraction below 1")
        check_fraction("ratio", self.ratio)
        if self.num_experts is not None and self.ratio is not None:
            raise FieldError("num_experts", self.num_experts, "give num_experts (kept per layer) or ratio "
                             "(fraction removed), not both")
        check_int("top_k", self.top_k, low=1)
        if self.num_experts is None and self.ratio is None and self.top_k is None:
            raise FieldError("ratio", None, "give num_experts or ratio (experts to remove), top_k, or both")
        if self.merge and not self.removes():
            raise FieldError("merge", self.merge, "merging needs experts to remove: give num_experts or ratio")

    def removes(self) -> bool:
        """Whether experts go (else only top-k changes)."""
        return self.num_experts is not None or self.ratio is not None

    def uses_data(self) -> bool:
        return self.removes()  # top-k alone needs no calibration

    def plan(self, config: Any) -> tuple[int, int, int]:
        """``(experts before, experts kept, top-k after)`` for a model of ``config``.

        Raises:
            ConfigError: a dense model (one line, from :func:`slimforge.moe.expert_count_key`).
            FieldError: more experts than the model has, none left, fewer than top-k, or a
                top-k the family's router cannot use.
        """
        from slimforge import moe
        from slimforge.prune.expert_scores import kept_count

        moe.expert_count_key(config)  # a dense model: one line naming the MoE families
        total, k = moe.num_experts(config), moe.top_k(config)
        if self.num_experts is not None and self.num_experts > total:
            raise FieldError("num_experts", self.num_experts,
                             f"the model has only {total} experts per layer; expert pruning cannot add any")
        keep = kept_count(total, self.num_experts, self.ratio)
        if keep < 1:
            raise FieldError("ratio", self.ratio, f"would remove all {total} experts of each layer; keep at least one")
        new_k = self.top_k if self.top_k is not None else k
        if keep == total and new_k == k:
            field_name = "num_experts" if self.num_experts is not None else ("ratio" if self.ratio else "top_k")
            raise FieldError(field_name, getattr(self, field_name),
                             f"changes nothing: all {total} experts per layer stay (a ratio rounds to whole experts) "
                             f"and top-k stays {k}; remove at least one expert or change top_k")
        if new_k > keep:
            field_name = "top_k" if self.top_k is not None else ("num_experts" if self.num_experts else "ratio")
            raise FieldError(field_name, getattr(self, field_name),
                             f"each token is routed to {new_k} experts but only {keep} of {total} would remain "
                             f"per layer; keep at least {new_k} experts or lower top_k")
        fixed = moe.FIXED_TOP_K.get(config.model_type)
        if self.top_k is not None and fixed is not None and self.top_k != fixed:
            raise FieldError("top_k", self.top_k, f"{config.model_type}'s router (sparsemixer) always routes each "
                             f"token to {fixed} experts; leave top_k unset or {fixed} for this model")
        return total, keep, new_k

    def preflight(self, teacher: TeacherInfo) -> None:
        self.plan(teacher.config)

    def check_input(self, parent: TeacherInfo) -> None:
        self.plan(parent.config)

    def planned_config(self, parent: TeacherInfo) -> Any:
        """The input's config with ``kept`` experts per layer and the new top-k."""
        import copy

        from slimforge import moe

        _, keep, k = self.plan(parent.config)
        config = copy.deepcopy(parent.config)
        moe.set_expert_count(config, keep)
        setattr(config, moe.TOP_K_KEY, k)
        return config

    def card_settings(self, meta: dict[str, Any]) -> list[str]:
        out = [f"score {self.score}", *named_settings(self, ("num_experts", "ratio", "top_k"))]
        return out + (["merge"] if self.merge else [])
