"""Many processes under ``torchrun``: environment detection, samplers, reductions, rank-0 writes.

Started by ``torchrun --nproc-per-node N -m bsconv_surgery train ...`` (``RANK``/``WORLD_SIZE``
set), training runs DistributedDataParallel with gloo on CPU and nccl on CUDA. Without those
variables everything here degrades to a single process with no communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler

from ..core.errors import SurgeryError

__all__ = ["DistEnv", "setup", "teardown", "all_reduce_sums", "any_rank", "gather", "broadcast",
           "barrier", "ResumableSampler", "ShardSampler"]


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> DistEnv:
    """Read torchrun's environment, pick the device, join the process group (gloo/nccl)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("device: cuda was asked for, but torch sees no CUDA device. Use device: auto or cpu.")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    env = DistEnv(rank, world_size, local_rank, dev)
    if env.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return env


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sums(sums: Dict[str, float], env: DistEnv) -> Dict[str, float]:
    """Sum a dict of numbers over all ranks (one collective)."""
    if not env.distributed or not sums:
        return dict(sums)
    keys = sorted(sums)
    buf = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(buf)
    return dict(zip(keys, buf.tolist()))


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop at the same step)."""
    if not env.distributed:
        return flag
    buf = torch.tensor([1 if flag else 0], dtype=torch.int32, device=env.device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return bool(buf.item())


def gather(obj: Any, env: DistEnv) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank."""
    if not env.distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, env: DistEnv) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not env.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by seed + epoch, also for one process) that can start
    ``skip`` samples into its epoch, so a run resumed mid-epoch sees the remaining batches."""

    skip: int = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``, in order, without padding: evaluation counts
    each sample exactly once across ranks."""

    def __init__(self, length: int, env: DistEnv):
        self.indices = range(env.rank, length, env.world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

