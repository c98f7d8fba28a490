"""Across processes (single-edit mode under DDP): each request is edited and scored by one process."""
from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def gather_dicts(trainer: Any, part: dict) -> dict:
    """The union of every process's `part` (keys are request indices, each held by one process);
    `part` itself when there is one process."""
    if trainer is None or trainer.world_size == 1 or not dist.is_initialized():
        return part
    parts: list[dict | None] = [None] * trainer.world_size
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in sorted(p.items())}


def independent_of_other_processes(trainer: Any) -> AbstractContextManager:
    """Under DDP each process edits its own requests on its own replica: no gradient averaging."""
    model = trainer.strategy.model
    return model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext()
