"""`kdpo-lightning`: LightningCLI over `KDPOEditor` and `SequentialEditDataModule`.

    kdpo-lightning fit --config configs/llama3_wikirecent.yaml
    kdpo-lightning fit --config configs/demo.yaml --ckpt_path last     # resume
    kdpo-lightning validate --config ... --model.apply_edit runs/x/results.edit.safetensors
    kdpo-lightning prepare-model smollm2-135m
"""
from __future__ import annotations

import os
import sys
import warnings

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningCLI

from .checkpoint import EditCheckpoint, check_checkpoint, last_checkpoint
from .data import SequentialEditDataModule
from .module import KDPOEditor, check_edit_mode


class EditProgressBar(TQDMProgressBar):
    """One tick per edit, out of the whole sequence (the edit stream itself has no length). Under DDP
    only process 0 shows it, and each of its steps stands for one edit on every process."""

    @property
    def total_train_batches(self) -> int:
        return len(self.trainer.datamodule.requests)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        done = min((batch_idx + 1) * trainer.world_size, self.total_train_batches)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, done - 1)


TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "enable_checkpointing": False,
    "enable_model_summary": False,
    "devices": 1,
    "default_root_dir": "runs",
    "callbacks": [EditProgressBar()],
}


class EditCLI(LightningCLI):
    """Loads the model before the run so the data module can tokenize with its tokenizer."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(EditCheckpoint, "checkpoint")

    def _prepare(self) -> None:
        self.model.load()
        self.datamodule.set_tokenizer(self.model.tokenizer)
        self.config_init[self.subcommand]["weights_only"] = True  # a resumed checkpoint never runs code

    def _parse_ckpt_path(self) -> None:
        """Check an explicit --ckpt_path before anything runs. Unlike Lightning's default, the
        checkpoint's saved hyperparameters do not override this run's config and flags.
        (Overrides a private LightningCLI hook: pyproject pins lightning below 2.8.)"""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path != "last":
            check_checkpoint(path)

    def before_fit(self) -> None:
        check_edit_mode(self.model.hparams.edit_mode, self.trainer.world_size)  # before any process starts
        self._prepare()
        self.trainer.limit_val_batches = 0  # `fit` evaluates in the module's hooks, not in a val loop
        callback = next(c for c in self.trainer.callbacks if isinstance(c, EditCheckpoint))
        kwargs = self.config_init[self.subcommand]
        if kwargs.get("ckpt_path") == "last":
            path = last_checkpoint(callback.resolve_dir(self.trainer))
            if not path.exists():
                raise FileNotFoundError(f"--ckpt_path last: no checkpoint at {path}; start without --ckpt_path")
            check_checkpoint(path)
            kwargs["ckpt_path"] = str(path)

    before_validate = before_test = _prepare


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; known errors end in one clear line, not a traceback."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["prepare-model"]:
        from .models import prepare_model_main

        return prepare_model_main(args[1:])
    from .data import DataError
    from .models import ModelNotFoundError, ProvisioningError, UnsafeWeightsError

    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # edits run in eval mode on purpose
    try:
        EditCLI(KDPOEditor, SequentialEditDataModule, trainer_defaults=TRAINER_DEFAULTS,
                save_config_kwargs={"overwrite": True}, args=argv)
    except (DataError, ModelNotFoundError, ProvisioningError, UnsafeWeightsError, ValueError, FileNotFoundError) as err:
        if os.environ.get("KDPO_DEBUG"):
            raise
        print(f"kdpo-lightning: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
