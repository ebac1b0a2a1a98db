"""Processes working together: who this process is, the process group, and the few collectives ft needs.

A process learns its place from its launcher (common/launcher.py: torchrun, accelerate launch or a plain srun,
whose names are copied into torch's by `export_srun_env`). Without one it is one process and nothing here
communicates.

The process group runs nccl on GPUs (each rank on cuda:LOCAL_RANK) and gloo on CPUs. Its timeout starts at
`--init-timeout` (joining, loading, sharding) and becomes `--nccl-timeout` once training starts (torchtitan's
init/train timeouts).

Errors: a rank that fails where the others would wait for it in a collective takes part in `agree()` instead,
so every rank stops with the failing rank's message (printed once), never a hang. An error every rank meets in
the same way (a bad flag, a missing shard set) is printed by rank 0 alone: `RankError.quiet` tells the CLI that
another rank prints it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from ft.common.errors import UserError
from ft.common.launcher import World, export_srun_env, world_from_env

__all__ = ["World", "export_srun_env", "world_from_env"]  # the launcher's names, where the trainer asks for them

T = TypeVar("T")


def initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init_process_group(world: World, device: str, timeout_s: float) -> None:
    """Join the process group: nccl on a GPU, gloo on a CPU; `timeout_s` until `set_timeout` changes it."""
    import torch
    import torch.distributed as dist

    export_srun_env(world)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise UserError(f"the environment says rank {world.rank} of {world.size} processes, but "
                        f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, so the processes "
                        "cannot meet; start ft with torchrun, srun or accelerate launch, which set them.")
    cuda = device.startswith("cuda")
    kwargs: dict[str, Any] = {"device_id": torch.device(device)} if cuda else {}
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s), **kwargs)
    except (dist.DistStoreError, dist.DistNetworkError) as e:  # the others never came, or the address is wrong
        raise UserError(f"rank {world.rank} of {world.size}: the processes did not meet at "
                        f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} within --init-timeout "
                        f"{timeout_s:g} s ({str(e).splitlines()[0]}); check that every process was started, with "
                        "the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, or raise --init-timeout.") from None


def set_timeout(timeout_s: float, *meshes: Any) -> None:
    """The timeout of every collective from here on (the training loop's, `--nccl-timeout`): of the default group
    and of each group of `meshes` (FSDP2, HSDP and context parallelism talk on those), after a barrier
    (torchtitan's set_pg_timeouts)."""
    if not initialized():
        return
    import torch.distributed as torch_dist
    from torch.distributed.distributed_c10d import _set_pg_timeout

    torch_dist.barrier()
    groups = [None] + [mesh.get_group(name) for mesh in meshes if mesh is not None for name in mesh.mesh_dim_names]
    for group in groups:
        _set_pg_timeout(timedelta(seconds=timeout_s), group)


def run_on_rank_zero(fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 while the others wait; a failure there stops every rank with its message. Returns rank 0's
    result to rank 0 (None elsewhere)."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:
            error = e
    agree(error)
    return result


def destroy(together: bool = True) -> None:
    """Leave the process group: after a run, every rank together (a rank tearing down while another still talks
    aborts it); after a failure, at once (another rank may never come)."""
    if initialized():
        import gc

        import torch.distributed as dist

        # collectives' results still unreferenced in cycles (context parallelism's functional all-gathers) wait
        # for their work when freed: freed now, while the process group lives (after it, gloo aborts the process)
        gc.collect()
        if together:
            dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    if not initialized():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def size() -> int:
    if not initialized():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        import torch.distributed as dist

        dist.barrier()


class RankError(UserError):
    """A UserError raised on every rank; `quiet` on all but the rank that prints it."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def raised_everywhere(error: UserError) -> RankError:
    """`error`, met by every rank alike: printed by rank 0 only (before the process group exists too)."""
    me = rank() if initialized() else world_from_env().rank
    out = RankError(str(error), quiet=me != 0)
    out.__cause__ = error
    return out


def same_on_every_rank(fn: Callable[[], T]) -> T:
    """Run `fn`, whose UserErrors every rank meets alike (the same files, flags and collectives)."""
    try:
        return fn()
    except RankError:
        raise
    except UserError as e:
        raise raised_everywhere(e) from e


def agree(error: BaseException | None) -> None:
    """A point every rank reaches: if any rank brings an error, every rank raises, and each distinct message is
    printed once (by the lowest rank that met it; other ranks' log lines carry their rank). One small all-reduce
    when nothing failed."""
    if not initialized():
        if error is not None:
            raise error
        return
    import torch
    import torch.distributed as dist

    device = "cpu" if dist.get_backend() == "gloo" else f"cuda:{torch.cuda.current_device()}"
    failed = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(failed)
    if int(failed.item()) == 0:
        return
    mine = None if error is None else (str(error) if isinstance(error, UserError) else
                                       f"{type(error).__name__}: {error}")
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, mine)
    me = dist.get_rank()
    first = {}
    for r, m in enumerate(messages):
        if m is not None and m not in first:
            first[m] = r
    if mine is not None:
        if not isinstance(error, UserError):
            raise error  # a bug: its traceback, on the rank that met it
        raise RankError(mine, quiet=first[mine] != me) from error
    r, m = min((r, m) for m, r in first.items())
    raise RankError(f"stopped because rank {r} failed: {m}", quiet=True)


def peer_lost(error: BaseException) -> str | None:
    """What a collective's error says when another rank hung (`--nccl-timeout` ran out) or died (its connection
    closed): a short phrase, or None for any other error."""
    text = str(error)
    if "Timed out" in text or "timed out" in text or "Watchdog caught collective operation timeout" in text:
        return "a collective timed out after --nccl-timeout"
    if "Connection closed by peer" in text or "Connection reset by peer" in text or "Broken pipe" in text:
        return "its connection closed"
    return None


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if not initialized():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
