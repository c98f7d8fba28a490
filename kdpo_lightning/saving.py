"""Files a run leaves: the edit (trained tensors + metadata) and how to apply it; atomic writes."""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`, then rename it over `path`: a crash mid-write leaves the
    previous file whole and no temp file behind. The temp name is the process's own, so processes
    writing the same file at once (two runs filling one cache) each rename a whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def edit_path(results_path: str | os.PathLike) -> Path:
    """Where a run saves its edit: beside its results file and named after it (results.json ->
    results.edit.safetensors), so runs sharing a folder keep their own edits."""
    return Path(results_path).with_suffix(".edit.safetensors")


def save_edit(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write the edited tensors and JSON metadata (base model, method, edits, config) atomically."""
    with atomic_write(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={"kdpo_lightning": json.dumps(metadata, default=str)})
    return Path(path)


def read_edit(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a saved edit. A missing file is a FileNotFoundError, anything but a
    safetensors file a ValueError: both one line naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"edit file {path} is a directory; pass the .edit.safetensors file a run saved")
    if not path.is_file():
        raise FileNotFoundError(f"edit file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("kdpo_lightning", "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a saved edit (a safetensors file): {e}; pass the .edit.safetensors "
                         "file a run saved") from None


def apply_edit(model: nn.Module, path: str | os.PathLike) -> dict:
    """Overwrite the model's tensors with a saved edit's; returns the edit's metadata.

    Afterwards `model.save_pretrained(dir)` writes the edited model as a normal checkpoint."""
    tensors, meta = read_edit(path)
    params = dict(model.named_parameters())
    missing = sorted(set(tensors) - set(params))
    if missing:
        raise ValueError(f"{path}: the model has no parameter(s) {missing}; was the edit made on another architecture?")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the model's is {tuple(params[name].shape)}")
            params[name].copy_(value)
    return meta
