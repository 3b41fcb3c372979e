"""Layer-sharded runs over torch.distributed (`torchrun --nproc-per-node N -m gelugemm_cli ...`).

verify gives rank r every MLP whose index i has i % N == r; quantize gives it every input
shard with that index, so each rank streams only its own layers and writes its own output
shards. Rank 0 gathers the per-layer results, prints the one report and writes the index,
config and JSON. Collective steps go through `together`, so an error on any rank ends every
rank with the same one line instead of leaving the others waiting.

Without a process group (a plain run) everything here is the single-process case: rank 0
of 1, and `together` just calls its function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from calibration.errors import CheckpointError
from kernels.errors import GelugemmError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def root(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mine(self, index: int) -> bool:
        """Whether item `index` (an MLP, an input shard) is this rank's."""
        return index % self.world == self.rank


def current() -> Ranks:
    """This process's place in the default process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> Ranks:
    """Join the process group torchrun describes: NCCL with a GPU per local rank, else gloo."""
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return current()


def all_gather(value: T, ranks: Ranks) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not ranks.distributed:
        return [value]
    out: list = [None] * ranks.world
    dist.all_gather_object(out, value)
    return out


def broadcast(value: T, ranks: Ranks) -> T:
    """Rank 0's `value` on every rank."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def together(ranks: Ranks, fn: Callable[[], T]) -> list[T]:
    """Run `fn` on every rank and gather the results; if it failed anywhere, raise on every rank
    (the first failing rank's message), so that no rank waits on a collective forever."""
    if not ranks.distributed:
        return [fn()]
    try:
        outcome = (fn(), None)
    except GelugemmError as exc:
        outcome = (None, str(exc))
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks
        outcome = (None, f"{type(exc).__name__}: {exc}")
    outcomes = all_gather(outcome, ranks)
    for rank, (_, error) in enumerate(outcomes):
        if error is not None:
            raise CheckpointError(error if rank == ranks.rank else f"rank {rank}: {error}")
    return [value for value, _ in outcomes]
