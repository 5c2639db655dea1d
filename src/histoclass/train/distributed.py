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

from histoclass.models import resolve_device

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


def setup(device: str = "auto") -> Dist:
    """Join the process group when launched by ``torchrun`` with several processes.

    Args:
        device: ``--device`` name; ``auto`` and ``cuda`` mean this process's GPU
            (``LOCAL_RANK``), see :func:`histoclass.models.resolve_device`.

    Raises:
        ValueError: An unknown device name, or CUDA asked for where there is none.
    """
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

