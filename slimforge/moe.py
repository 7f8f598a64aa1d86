"""The mixture-of-experts side of the architecture adapter (``arch.py`` holds the dense side).

transformers 5 stores a sparse MoE block's experts fused, as two 3D parameters of one module
(``experts.gate_up_proj`` ``[E, 2I, H]``, gate rows first, and ``experts.down_proj``
``[E, H, I]``), beside a router whose ``weight`` is ``[E, H]``. Mixtral, PhiMoE, Qwen2-MoE and
Qwen3-MoE share that layout; they differ in where the router lives (``gate`` or ``router``),
in the config key holding the expert count, in how the router turns logits into weights
(softmax top-k, renormalised or not; PhiMoE's sparsemixer) and in Qwen2-MoE's always-on
shared expert. Code that measures or edits experts goes through here.

Two kinds of edit keep a model a plain Hugging Face folder:

* :func:`keep_experts` removes experts from every MoE block (the same count in each, since a
  config holds one expert count), slicing the router's rows with them;
* :func:`set_top_k` changes how many experts each token is routed to.

Calibration-based methods (Wanda, SparseGPT, GPTQ) work on ``nn.Linear`` modules. Inside
:func:`unfused_experts` each fused experts module is swapped for :class:`UnfusedExperts`, which
computes the same function with one ``gate_proj``/``up_proj``/``down_proj`` ``nn.Linear`` per
expert (``experts.<e>.gate_proj`` ...); each linear sees exactly the tokens routed to its
expert. On exit the (edited) linears are written back into the fused parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimforge.errors import ConfigError
from slimforge.moe_layout import (  # noqa: F401  (config-only MoE facts, torch-free; re-exported)
    MOE_MODEL_TYPES,
    ROUTER_NAMES,
    expert_of,
    expert_widths,
    is_moe_config,
    is_router_name,
    keep_sparse_layout,
    refuse_moe,
    router_aux_coef,
    sparse_layers,
)

# The config key holding the number of routed experts per MoE block.
_EXPERT_COUNT_KEY = {"mixtral": "num_local_experts", "phimoe": "num_local_experts",
                     "qwen2_moe": "num_experts", "qwen3_moe": "num_experts"}
TOP_K_KEY = "num_experts_per_tok"


def expert_count_key(config: Any) -> str:
    """The config key of the routed-expert count (``num_local_experts`` or ``num_experts``)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _EXPERT_COUNT_KEY:
        raise ConfigError(f"model type {model_type!r} is not a mixture of experts; expert pruning needs one of "
                          f"{', '.join(MOE_MODEL_TYPES)}")
    return _EXPERT_COUNT_KEY[model_type]


def num_experts(config: Any) -> int:
    return int(getattr(config, expert_count_key(config)))


def top_k(config: Any) -> int:
    return int(getattr(config, TOP_K_KEY))


@dataclass
class MoEBlock:
    """One sparse MoE block of a decoder layer: its router, its fused experts, and its shared expert if any."""

    layer_index: int
    block: nn.Module  # the layer's ``mlp``
    router: nn.Module  # ``weight`` [E, H]; called on [tokens, H] -> (logits, weights, indices)
    router_name: str  # "gate" or "router", local to the block
    experts: nn.Module  # ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I] (or UnfusedExperts)
    shared_expert: nn.Module | None = None
    shared_expert_gate: nn.Module | None = None

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])


def moe_block(layer: nn.Module, index: int = -1) -> MoEBlock | None:
    """The layer's sparse MoE block, or ``None`` for a dense layer (Qwen2/3-MoE's ``mlp_only_layers``)."""
    mlp = getattr(layer, "mlp", None)
    experts = getattr(mlp, "experts", None)
    if experts is None:
        return None
    for name in ("gate", "router"):
        router = getattr(mlp, name, None)
        if router is not None and getattr(router, "weight", None) is not None and router.weight.dim() == 2 \
                and router.weight.shape[0] == _fused_count(experts):
            return MoEBlock(index, mlp, router, name, experts, getattr(mlp, "shared_expert", None),
                            getattr(mlp, "shared_expert_gate", None))
    return None


def _fused_count(experts: nn.Module) -> int:
    if isinstance(experts, UnfusedExperts):
        return len(experts)
    return int(experts.gate_up_proj.shape[0])


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every sparse MoE block of the model, in layer order (dense layers skipped)."""
    from slimforge.arch import decoder_layers

    out = []
    for i, layer in enumerate(decoder_layers(model)):
        block = moe_block(layer, i)
        if block is not None:
            out.append(block)
    return out


def require_moe(model: nn.Module, what: str = "expert pruning") -> list[MoEBlock]:
    """The model's MoE blocks; a one-line :class:`ConfigError` for a dense model."""
    config = getattr(model, "config", None)
    blocks = moe_blocks(model) if is_moe_config(config) else []
    if not blocks:
        raise ConfigError(f"{what} needs a mixture-of-experts model ({', '.join(MOE_MODEL_TYPES)}), but this "
                          f"{getattr(config, 'model_type', type(model).__name__)} model has no experts; "
                          "use depth or width pruning for a dense model")
    return blocks


def expert_weights(block: MoEBlock, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``(gate [I, H], up [I, H], down [H, I])`` of one expert's weights (fused layout)."""
    experts = block.experts
    if isinstance(experts, UnfusedExperts):
        e = experts[expert]
        return e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight
    inter = experts.down_proj.shape[-1]
    gate_up = experts.gate_up_proj[expert]
    return gate_up[:inter], gate_up[inter:], experts.down_proj[expert]


@torch.no_grad()
def route(block: MoEBlock, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The router's ``(logits [T, E], weights [T, k], indices [T, k])`` for ``hidden`` [T, H], in eval mode.

    The weights are what the block multiplies each chosen expert's output by (after the
    family's own normalisation), so ``weights * ||expert(x)||`` is the expert's contribution.
    """
    was = block.router.training
    block.router.eval()
    try:
        logits, weights, indices = block.router(hidden.reshape(-1, hidden.shape[-1]))
    finally:
        block.router.train(was)
    return logits, weights, indices


def _set_count(module: nn.Module, count: int) -> None:
    if hasattr(module, "num_experts"):
        module.num_experts = count


@torch.no_grad()
def keep_experts(model: nn.Module, keep: list[list[int]]) -> None:
    """Keep, in MoE block ``i``, only the experts ``keep[i]`` (in that order), in place.

    Every block must keep the same number of experts (a config holds one count) and at least
    the router's top-k. The router's rows are sliced with the experts, so the survivors are
    routed to exactly as before wherever the removed experts were not chosen.
    """
    blocks = require_moe(model)
    config = model.config
    if len(keep) != len(blocks):
        raise ConfigError(f"expert lists must name one list per MoE block ({len(blocks)}), got {len(keep)}")
    counts = {len(k) for k in keep}
    if len(counts) != 1:
        raise ConfigError(f"every MoE block must keep the same number of experts (a config holds one count), "
                          f"got {sorted(counts)}")
    count = counts.pop()
    if count < 1:
        raise ConfigError("cannot remove every expert of a layer; keep at least top-k "
                          f"({top_k(config)}) experts per layer")
    if count < top_k(config):
        raise ConfigError(f"keeping {count} experts per layer leaves fewer than the {top_k(config)} each token is "
                          f"routed to; keep at least {top_k(config)} or lower top_k first")
    for block, kept in zip(blocks, keep, strict=True):  # every list checked before any block changes
        if len(set(kept)) != len(kept) or any(not 0 <= e < block.num_experts for e in kept):
            raise ConfigError(f"experts to keep in layer {block.layer_index} must be distinct indices in "
                              f"[0, {block.num_experts - 1}], got {kept}")
    for block, kept in zip(blocks, keep, strict=True):
        keep_block_experts(block, kept)
    set_expert_count(config, count)


@torch.no_grad()
def keep_block_experts(block: MoEBlock, kept: list[int]) -> None:
    """Keep only the experts ``kept`` (in that order) of one MoE block, slicing its router rows, in place.

    The model's config is not touched: :func:`keep_experts` (every block at once) or the caller
    sets the count once every block holds it. Between the two, the blocks still run (each
    module knows its own count), which is what layer-by-layer expert pruning needs.
    """
    count, total = len(kept), block.num_experts
    if count < 1 or len(set(kept)) != count or any(not 0 <= e < total for e in kept):
        raise ConfigError(f"experts to keep in layer {block.layer_index} must be distinct indices in "
                          f"[0, {total - 1}], at least one, got {kept}")
    index = torch.tensor(kept, dtype=torch.long, device=block.router.weight.device)
    block.router.weight = nn.Parameter(block.router.weight.data.index_select(0, index).clone(),
                                       requires_grad=block.router.weight.requires_grad)
    if getattr(block.router, "bias", None) is not None:
        block.router.bias = nn.Parameter(block.router.bias.data.index_select(0, index).clone())
    if isinstance(block.router, nn.Linear):
        block.router.out_features = count
    experts = block.experts
    if isinstance(experts, UnfusedExperts):
        survivors = [experts[e] for e in kept]
        for name in list(experts._modules):
            del experts._modules[name]
        experts.extend(survivors)
    else:
        for name in ("gate_up_proj", "down_proj"):
            param = getattr(experts, name)
            setattr(experts, name, nn.Parameter(param.data.index_select(0, index.to(param.device)).clone(),
                                                requires_grad=param.requires_grad))
        for name in ("gate_up_proj_bias", "down_proj_bias"):
            bias = getattr(experts, name, None)
            if isinstance(bias, torch.Tensor):
                setattr(experts, name, nn.Parameter(bias.data.index_select(0, index.to(bias.device)).clone()))
    for module in (block.router, block.block, *(() if isinstance(experts, UnfusedExperts) else (experts,))):
        _set_count(module, count)


def set_expert_count(config: Any, count: int) -> None:
    """Record ``count`` routed experts per MoE block in ``config`` (after every block holds that many)."""
    setattr(config, expert_count_key(config), int(count))


@torch.no_grad()
def set_expert_weights(block: MoEBlock, expert: int, gate: torch.Tensor, up: torch.Tensor,
                       down: torch.Tensor) -> None:
    """Overwrite one expert's ``(gate [I, H], up [I, H], down [H, I])`` weights in place (fused or unfused)."""
    for target, value in zip(expert_weights(block, expert), (gate, up, down), strict=True):
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def expert_forward(block: MoEBlock, expert: int, hidden: torch.Tensor) -> torch.Tensor:
    """Expert ``expert``'s output ``down(act(gate(x)) * up(x))`` for tokens ``hidden`` [T, H], unweighted."""
    gate, up, down = expert_weights(block, expert)
    x = hidden.to(gate.dtype)
    act = block.experts.act_fn
    return nn.functional.linear(act(nn.functional.linear(x, gate)) * nn.functional.linear(x, up), down)


def parameters_per_expert(block: MoEBlock) -> int:
    """Parameters one routed expert of ``block`` holds (gate, up, down and biases if any; fused or unfused)."""
    return _expert_numel(block)


# Families whose router picks a fixed number of experts whatever ``num_experts_per_tok`` says:
# PhiMoE's sparsemixer always picks two (a top-1 pass, then a top-1 among the rest).
FIXED_TOP_K = {"phimoe": 2}


def check_top_k(config: Any, k: int) -> None:
    """Refuse, in one line, a top-k this family's router cannot route with."""
    fixed = FIXED_TOP_K.get(getattr(config, "model_type", None))
    if fixed is not None and k != fixed:
        raise ConfigError(f"top_k={k}: {config.model_type}'s router (sparsemixer) always routes each token to "
                          f"{fixed} experts; leave top_k unset or {fixed} for this model")


def set_top_k(model: nn.Module, k: int) -> None:
    """Route each token to ``k`` experts in every MoE block (config and modules)."""
    blocks = require_moe(model, "changing top-k")
    available = min(b.num_experts for b in blocks)
    if not 1 <= k <= available:
        raise ConfigError(f"top_k={k} must lie in [1, {available}] (the experts each layer has); "
                          "lower top_k or keep more experts")
    check_top_k(model.config, k)
    for block in blocks:
        for module in (block.router, block.block):
            if hasattr(module, "top_k"):
                module.top_k = k
    setattr(model.config, TOP_K_KEY, k)


class _Expert(nn.Module):
    """One expert as three ``nn.Linear`` (no bias): ``down(act(gate(x)) * up(x))``."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight.data.copy_(weight)
    layer.weight.requires_grad_(weight.requires_grad)
    return layer


class UnfusedExperts(nn.ModuleList):
    """A fused experts module's function with one linear triple per expert (see the module docstring).

    A ``ModuleList`` of experts, so expert ``e``'s linears are named ``experts.<e>.gate_proj`` etc.
    """

    def __init__(self, fused: nn.Module):
        if any(isinstance(getattr(fused, n, None), torch.Tensor) for n in ("gate_up_proj_bias", "down_proj_bias")):
            raise ConfigError("experts with biases are not supported by the unfused calibration view")
        inter = fused.down_proj.shape[-1]
        super().__init__(
            _Expert(fused.gate_up_proj[e, :inter].detach(), fused.gate_up_proj[e, inter:].detach(),
                    fused.down_proj[e].detach())
            for e in range(int(fused.gate_up_proj.shape[0]))
        )
        self.__dict__["act_fn"] = fused.act_fn  # not a list entry (it holds no parameters)

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        counts = self.__dict__.get("routed_tokens")  # set by routed_tokens(): per-expert routed counts
        see_all = self.__dict__.get("see_all_tokens", False)  # set by every_expert_sees_every_token()
        for e, expert in enumerate(self):
            token_idx, slot = torch.where(top_k_index == e)
            if counts is not None:
                counts[e] += int(token_idx.numel())
            if see_all:  # every token through the expert (for the hooks); only the routed ones count
                x = hidden_states
                y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                x = hidden_states[token_idx]
                y = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            y = y * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out

    @torch.no_grad()
    def fuse_into(self, fused: nn.Module) -> None:
        """Write the linears back into ``fused``'s 3D parameters (resized if experts were removed)."""
        gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self])
        down = torch.stack([e.down_proj.weight for e in self])
        fused.gate_up_proj = nn.Parameter(gate_up.to(fused.gate_up_proj.dtype),
                                          requires_grad=fused.gate_up_proj.requires_grad)
        fused.down_proj = nn.Parameter(down.to(fused.down_proj.dtype), requires_grad=fused.down_proj.requires_grad)
        _set_count(fused, len(self))


@contextlib.contextmanager
def unfused_experts(model: nn.Module) -> Iterator[list[MoEBlock]]:
    """Within the block, every fused experts module is an :class:`UnfusedExperts`; on exit, fused again.

    A dense model passes through unchanged (an empty list). The edits made to the per-expert
    linears (pruned or quantized weights) are what the fused parameters hold afterwards.
    """
    if not is_moe_config(getattr(model, "config", None)):
        yield []
        return
    blocks = moe_blocks(model)
    swapped = []
    for block in blocks:
        if isinstance(block.experts, UnfusedExperts):
            continue
        fused = block.experts
        unfused = UnfusedExperts(fused)
        block.block.experts = unfused
        block.experts = unfused
        swapped.append((block, fused))
    try:
        yield blocks
    finally:
        for block, fused in swapped:
            block.experts.fuse_into(fused)
            block.block.experts = fused
            block.experts = fused


# --- what the dense methods need to know about MoE models (issue 18) ---------------------------


def _expert_numel(block: MoEBlock) -> int:
    """Parameters of one routed expert of ``block`` (fused or unfused)."""
    experts = block.experts
    if isinstance(experts, UnfusedExperts):
        return sum(p.numel() for p in experts[0].parameters())
    total = 0
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        tensor = getattr(experts, name, None)
        if isinstance(tensor, torch.Tensor):
            total += tensor[0].numel()
    return total


def inactive_parameters(model: nn.Module) -> int:
    """Parameters a token does not use: in each MoE block, ``E - top_k`` routed experts' worth."""
    if not is_moe_config(getattr(model, "config", None)):
        return 0
    k = top_k(model.config)
    return sum(max(b.num_experts - k, 0) * _expert_numel(b) for b in moe_blocks(model))


def active_parameters(model: nn.Module, total: int | None = None) -> int | None:
    """Parameters one token uses: ``total`` (default: the model's, tied weights once) less
    :func:`inactive_parameters` (the shared expert, attention, embeddings and head always work);
    None for a dense model."""
    if not is_moe_config(getattr(model, "config", None)):
        return None
    if total is None:
        from slimforge.arch import count_parameters

        total = count_parameters(model)
    return total - inactive_parameters(model)


class RouterLogits:
    """Hooks that keep each MoE router's logits [tokens, E] of the forward passes run while they are on."""

    def __init__(self, model: nn.Module) -> None:
        self.logits: list[torch.Tensor] = []
        self._handles = [b.router.register_forward_hook(self._hook) for b in moe_blocks(model)]

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self.logits.append(output[0] if isinstance(output, tuple | list) else output)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@contextlib.contextmanager
def capture_router_logits(model: nn.Module) -> Iterator[RouterLogits]:
    """Record every MoE router's logits (with their autograd graph) while the block runs."""
    recorder = RouterLogits(model)
    try:
        yield recorder
    finally:
        recorder.remove()


def load_balancing_loss(model: nn.Module, router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...],
                        attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The family's own auxiliary load-balancing loss (``load_balancing_loss_func`` of its modeling module),
    unweighted, over the routers' logits of one forward: what ``model(..., output_router_logits=True).aux_loss``
    holds."""
    import importlib

    config = model.config
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return module.load_balancing_loss_func(tuple(router_logits), num_experts(config), top_k(config), attention_mask)


@contextlib.contextmanager
def every_expert_sees_every_token(model: nn.Module) -> Iterator[None]:
    """Inside :func:`unfused_experts`: every expert's linears run on every token (what calibration hooks see),
    while the block's output still sums only the routed experts' outputs (what later layers see).

    llm-compressor's "calibrate all experts": an expert that is routed few calibration tokens would
    otherwise get a rank-deficient Hessian.
    """
    unfused = [b.experts for b in moe_blocks(model) if isinstance(b.experts, UnfusedExperts)]
    for experts in unfused:
        experts.__dict__["see_all_tokens"] = True
    try:
        yield
    finally:
        for experts in unfused:
            experts.__dict__.pop("see_all_tokens", None)


@contextlib.contextmanager
def routed_tokens(module: nn.Module) -> Iterator[dict[str, int]]:
    """Count the tokens routed to each unfused expert inside ``module`` (a model or one decoder block) while
    the block runs; the dict, filled on exit, maps each expert's name inside ``module`` (``mlp.experts.3``)
    to its count."""
    found = {name: m for name, m in module.named_modules() if isinstance(m, UnfusedExperts)}
    for experts in found.values():
        experts.__dict__["routed_tokens"] = [0] * len(experts)
    out: dict[str, int] = {}
    try:
        yield out
    finally:
        for name, experts in found.items():
            counts = experts.__dict__.pop("routed_tokens")
            out.update({f"{name}.{e}" if name else str(e): c for e, c in enumerate(counts)})


class ExpertCoverage:
    """How many calibration tokens the router sent each expert, gathered block by block, for a stage's report.

    ``min_tokens``: an expert routed fewer counts as having "few" tokens (what a method does about it is the
    method's: Wanda and SparseGPT fall back to magnitude for an expert with none; GPTQ's policy is its
    ``moe_calibration``).
    """

    def __init__(self, min_tokens: int = 1) -> None:
        self.min_tokens = min_tokens
        self.counts: dict[str, int] = {}  # "layers.<i>.mlp.experts.<e>" -> routed tokens

    def add(self, layer_index: int, routed: dict[str, int]) -> None:
        """Fold in one block's :func:`routed_tokens` counts."""
        self.counts.update({f"layers.{layer_index}.{name}": count for name, count in routed.items()})

    def few(self) -> list[str]:
        """The experts routed fewer than ``min_tokens`` tokens."""
        return [name for name, count in self.counts.items() if count < self.min_tokens]

    def report(self, **extra: Any) -> dict[str, Any] | None:
        """Counts for ``slimforge.json``: experts, those with no tokens and with few, routed-token min/median/max."""
        if not self.counts:
            return None
        values = sorted(self.counts.values())
        return {"experts": len(values), "experts_without_tokens": sum(v == 0 for v in values),
                "experts_below_min_tokens": len(self.few()), "min_tokens": self.min_tokens,
                "routed_tokens": {"min": values[0], "median": values[len(values) // 2], "max": values[-1]},
                **extra}


def expert_name(linear_name: str) -> str | None:
    """``mlp.experts.3`` for ``mlp.experts.3.up_proj`` (an unfused expert's linear), else None."""
    return linear_name.rsplit(".", 1)[0] if expert_of(linear_name) is not None else None
