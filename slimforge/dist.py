"""Process-group helpers: the same code runs in one process or under ``accelerate launch``.

Every rank runs the pipeline; only the main rank writes the run directory. Stages
that train (distill) run on every rank; the others run on the main rank while the
rest wait at a barrier and then read the artifact.
"""

from __future__ import annotations

import os


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    if _initialized():
        import torch.distributed as dist

        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if _initialized():
        import torch.distributed as dist

        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    return world_size() > 1


def barrier() -> None:
    if _initialized():
        import torch.distributed as dist

        dist.barrier()


def ensure_process_group() -> None:
    """Join the process group that ``accelerate launch``/``torchrun`` set up, if any."""
    if world_size() > 1 and not _initialized():
        from accelerate import PartialState

        PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
                     or not _cuda_available())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def all_true(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank."""
    if not _initialized():
        return flag
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def broadcast_object(obj: object) -> object:
    """The main rank's ``obj`` on every rank."""
    if not _initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn, *args, **kwargs):
    """Run ``fn`` on the main rank only and hand its result to every rank.

    A :class:`~slimforge.errors.SlimforgeError` raised on the main rank is raised
    on every rank (so none waits forever at the next barrier); anything else
    stops the main rank with its traceback and the others with a short error.
    """
    if not is_distributed() or not _initialized():
        return fn(*args, **kwargs)
    from slimforge.errors import SlimforgeError

    payload: tuple = ("ok", None)
    error: BaseException | None = None
    if is_main():
        try:
            payload = ("ok", fn(*args, **kwargs))
        except SlimforgeError as err:
            payload, error = ("user", type(err).__name__, str(err)), err
        except BaseException as err:  # noqa: BLE001 - every rank must learn about it
            payload, error = ("bug", type(err).__name__, str(err)), err
    payload = broadcast_object(payload)
    if error is not None:
        raise error
    if payload[0] == "ok":
        return payload[1]
    from slimforge.errors import SlimforgeError as _Err

    raise _Err(f"the main process failed ({payload[1]}): {payload[2]}")


def main_then_others(fn, *args, **kwargs):
    """Run ``fn`` on the main rank first (filling shared caches), then on the others.

    Every rank gets its own result; an error on the main rank stops all ranks.
    """
    if not is_distributed() or not _initialized():
        return fn(*args, **kwargs)
    box: list = []

    def first() -> None:
        box.append(fn(*args, **kwargs))

    on_main(first)
    return box[0] if is_main() else fn(*args, **kwargs)


def shutdown() -> None:
    """Leave the process group cleanly (without this, gloo runs sometimes hang at exit)."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
