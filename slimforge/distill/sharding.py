"""FSDP2 sharding of the distillation trainer's models: torch's ``fully_shard``, driven directly.

accelerate 1.15 ignores its FSDP plugin in multi-CPU runs, so the trainer shards the models
itself (as torchtune does) in any ``torchrun`` / ``accelerate launch --multi_gpu`` run whose
stage sets ``sharding: fsdp``; the rest of the loop (autocast, loss reduction, trackers, the
schedule and RNG checkpoints) stays accelerate's.

What is sharded, over one 1-D mesh of every process:

- the student: each decoder layer is its own FSDP unit, and the trainer's
  :class:`~slimforge.distill.wiring.StudentWithLoss` wrapper is the root unit, holding the
  embeddings, the final norm, the lm_head and the hidden-state projections. The chunked loss reads
  the lm_head's weight directly, not through its forward, which is right only inside the root's
  forward (where FSDP has gathered the root unit): the wrapper's forward is the whole loss, and
  the held-out evaluation during training runs through it too;
- the frozen teacher: each decoder layer is its own unit, gathered for its forward and freed after
  it. Its embeddings, final norm and lm_head stay whole on every rank, because the chunked loss
  reads the teacher's head outside any teacher forward.

Checkpoints are torch.distributed.checkpoint folders (every rank writes its own shards); the final
student is gathered whole on the main rank (:func:`full_state_on_main`) and rebuilt there as a
plain model (:func:`unsharded_copy`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimforge.arch import decoder_layers
from slimforge.distill.config import fsdp_process_problem
from slimforge.errors import ConfigError

# The folder inside a checkpoint that holds the sharded model and optimizer state.
SHARDED_STATE_DIR = "sharded"


def require_processes(world_size: int) -> None:
    """FSDP splits the weights over processes: refuse it in a single process, before anything trains."""
    why = fsdp_process_problem(world_size)
    if why:
        raise ConfigError(f"sharding=fsdp: {why}")


def require_unquantized(student: Any) -> None:
    """A quantized (bitsandbytes) student's packed weights cannot be sharded: refuse it before training."""
    if getattr(student, "is_quantized", False) or getattr(student, "hf_quantizer", None) is not None:
        raise ConfigError("sharding=fsdp: the student is quantized (its packed 4-bit or 8-bit weights cannot be "
                          "sharded); train it with sharding=none (DDP), or distil an unquantized student")


def device_mesh(device: torch.device) -> Any:
    """One 1-D mesh over every process of the default process group (plain FSDP, no replication groups)."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (tdist.get_world_size(),))


def shard_student(wrapped: torch.nn.Module, student: Any, mesh: Any) -> None:
    """Each decoder layer of ``student`` a unit, then ``wrapped`` (which holds it) the root unit, in place."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(student):
        fully_shard(layer, mesh=mesh)
    fully_shard(wrapped, mesh=mesh)


def shard_teacher(teacher: Any, mesh: Any) -> None:
    """Each decoder layer of the frozen ``teacher`` a unit, gathered for its forward only, in place."""
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(teacher):
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)


def shard_masks(masked: list[tuple[torch.nn.Linear, torch.Tensor]]) -> list[tuple[torch.nn.Linear, Any]]:
    """Each whole sparsity mask split like its (sharded) layer's weight, so re-applying it stays local."""
    from torch.distributed.tensor import distribute_tensor

    return [(module, distribute_tensor(mask, module.weight.device_mesh, module.weight.placements))
            for module, mask in masked]


def held_here(module: torch.nn.Module) -> tuple[int, int]:
    """How many of ``module``'s parameter elements this rank holds, and how many it has in all."""
    from torch.distributed.tensor import DTensor

    params = list(module.parameters())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    return local, sum(p.numel() for p in params)


def full_state_on_main(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a sharded ``module`` on the main rank, in CPU memory; empty on the others.

    Every rank must call it (it all-gathers each tensor).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` (e.g. ``student.``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def unsharded_copy(student: Any, state: dict[str, torch.Tensor]) -> Any:
    """A plain (unsharded) model of ``student``'s class and config holding ``state``, on the CPU.

    ``student`` is the trained model whose decoder layers are sharded (it is not an FSDP unit
    itself: its wrapper is); a peft model (LoRA) is rebuilt as the same adapters on a fresh base.
    The copy is built on the meta device and filled from ``state`` (every parameter and persistent
    buffer); the buffers the state dict leaves out (rotary frequencies) are copied from ``student``,
    where FSDP keeps them whole. Tied weights are tied again.
    """
    peft = hasattr(student, "peft_config")
    base_cls = type(student.get_base_model()) if peft else type(student)
    with torch.device("meta"):
        model = base_cls._from_config(student.config, dtype=next(iter(state.values())).dtype)
    model.to_empty(device="cpu")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    if peft:
        from peft import get_peft_model

        model = get_peft_model(model, student.peft_config["default"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = set(model.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise RuntimeError(f"the gathered student does not fit its class: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        source = dict(student.named_buffers())
        for name, buf in model.named_buffers():
            if name not in state and name in source:
                buf.copy_(source[name].detach().to("cpu"))
    model.generation_config = student.generation_config
    return model


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write the sharded model and optimizer state under ``folder/sharded`` (every rank its own shards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(Path(folder) / SHARDED_STATE_DIR))


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore what :func:`save_sharded` wrote into the (already sharded) ``model`` and ``optimizer``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_STATE_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
