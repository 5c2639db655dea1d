"""Multi-process training glue: the same command runs alone or under ``torchrun``.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``; when ``WORLD_SIZE > 1``
we join the process group from those variables (``nccl`` on CUDA, ``gloo`` on CPU). Only rank 0
writes files and logs progress.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """Where this process sits: rank, number of processes, and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")  # noqa: RUF009 - immutable

    @property
    def main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when running with several processes."""
        return self.world > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this process's GPU if there is one, else CPU; other names pass through."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    return torch.device(name)


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by ``torchrun`` with several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d/%d on %s (%s)", rank, world, dev, backend)
    return Dist(rank, world, local_rank, dev)


def cleanup(d: Dist) -> None:
    """Leave the process group (a no-op when alone)."""
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather(obj: Any, d: Dist) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` when alone)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def mean_across(value: float, d: Dist) -> float:
    """The mean of a float over processes, so every process takes the same decisions."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return float(t.item()) / d.world


def broadcast(obj: Any, d: Dist) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
