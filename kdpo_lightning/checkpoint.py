"""Resumable runs: a checkpoint every K edits holding only what changes, written atomically."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning as L
import torch

from .saving import atomic_write


def last_checkpoint(dirpath: str | os.PathLike) -> Path:
    return Path(dirpath) / "last.ckpt"


class UnsafeCheckpointError(ValueError):
    """A checkpoint holding pickled objects beyond tensors and plain data: loading it could run code."""


def check_checkpoint(path: str | os.PathLike) -> None:
    """Fail with one clear line, before anything runs, if `path` is not a kdpo-lightning checkpoint.

    Loads with `weights_only=True`, as the resume itself does (`cli.py`): only tensors and plain data
    are unpickled, so a crafted file is refused and nothing in it runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from None
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise ValueError(f"checkpoint {path} is corrupt or not a checkpoint (UnpicklingError: {err})") from None
        raise UnsafeCheckpointError(
            f"checkpoint {path} refused: it holds pickled objects other than tensors and plain data, and loading "
            "them could run code (kdpo-lightning checkpoints never do)") from None
    except Exception as err:  # torch.load raises many types for a truncated or foreign file
        raise ValueError(f"checkpoint {path} is corrupt or not a checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or "kdpo" not in state:
        raise ValueError(f"checkpoint {path} was not written by kdpo-lightning (no 'kdpo' state)")


class EditCheckpoint(L.Callback):
    """Save `last.ckpt` after every `every_n_edits` edits and after the last one.

    The file holds the trained tensors, the stream position, the records so far and the RNG
    state (see `KDPOEditor.on_save_checkpoint`) and the callbacks' state, not the model. List it after the
    evaluation callbacks (the CLI does), so that a checkpoint holds each edit's scores too. It is written to a temp file and
    renamed, so a kill during the write leaves the previous checkpoint valid. Not written under DDP
    (single mode over several processes: each holds only its own records).
    """

    def __init__(self, dirpath: str | None = None, every_n_edits: int = 10) -> None:
        if every_n_edits < 1:
            raise ValueError(f"every_n_edits must be at least 1, got {every_n_edits}")
        self.dirpath, self.every_n_edits = dirpath, every_n_edits

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.world_size > 1:  # each process holds other records: resuming is for one process
            return
        done = len(pl_module.records)
        if done % self.every_n_edits == 0 or done == len(trainer.datamodule.requests):
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        path = last_checkpoint(self.resolve_dir(trainer))
        with atomic_write(path) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)  # the whole run state, not only the weights
        return path
