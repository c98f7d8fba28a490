"""`kdpo-lightning`: LightningCLI over `KDPOEditor` and `SequentialEditDataModule`.

    kdpo-lightning fit --config configs/llama3_wikirecent.yaml
    kdpo-lightning fit --config configs/demo.yaml --ckpt_path last     # resume
    kdpo-lightning validate --config ... --model.apply_edit runs/x/results.edit.safetensors
    kdpo-lightning prepare-model smollm2-135m
    kdpo-lightning prepare-data knowedit

The editor's knobs are grouped (`--model.edit.lr`, `--model.target.layer`); what is measured around
the edits is configured on its callbacks (`--evaluation.*`, `--retention.*`, `--results.path`). The flat
flags of earlier releases (`--model.lr`, `--model.eval_mode`, ...) are still accepted.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.cli import LightningCLI

from .callbacks import EditEvaluation, EditResults, RetentionCurve
from .checkpoint import EditCheckpoint, check_checkpoint, last_checkpoint
from .config import GROUPS, check_edit_mode, flat_flags
from .data import SequentialEditDataModule
from .module import KDPOEditor

CALLBACKS = {"evaluation": EditEvaluation, "retention": RetentionCurve, "results": EditResults,
             "checkpoint": EditCheckpoint}
"""Callbacks every CLI run has, configured under their key (`--evaluation.mode after_each`)."""
RENAMED = {
    **flat_flags(GROUPS),
    "--model.eval_mode": "--evaluation.mode", "--model.eval_batch_size": "--evaluation.batch_size",
    **{f"--model.{k}": f"--evaluation.{k}" for k in ("fluency", "fluency_sampling", "max_new_tokens",
                                                     "generation_max_tokens")},
    "--model.generation_metrics": "--evaluation.generation",
    "--model.eval_every_n_edits": "--retention.every_n_edits",
    "--model.capability": "--retention.capability", "--model.capability_n": "--retention.capability_n",
    "--model.results_path": "--results.path",
}
"""Flags of earlier releases and their names now."""


def renamed_flags(args: list[str]) -> list[str]:
    """`args` with flags of earlier releases (`--model.lr 1e-3`, `--model.eval_mode=after_each`) renamed."""
    out = []
    for arg in args:
        flag, sep, value = arg.partition("=")
        out.append(RENAMED.get(flag, flag) + sep + value if flag in RENAMED else arg)
    return out


class _NoLitLoggerTip(logging.Filter):
    """Lightning advertises its cloud logger on every run; a command-line tool prints only its own output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


class EditProgressBar(TQDMProgressBar):
    """One tick per edit, out of the whole sequence (the edit stream itself has no length). Under DDP
    only process 0 shows it, and each of its steps stands for one edit on every process."""

    @property
    def total_train_batches(self) -> int:
        return len(self.trainer.datamodule.requests)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        done = min((batch_idx + 1) * trainer.world_size, self.total_train_batches)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, done - 1)

    def get_metrics(self, trainer, pl_module) -> dict:
        """The share of this process's edits that succeeded so far, beside Lightning's own items."""
        records = pl_module.records.values()
        rate = {"success_rate": f"{sum(r['success'] for r in records) / len(records):.3f}"} if records else {}
        return {**super().get_metrics(trainer, pl_module), **rate}


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
        for key, callback in CALLBACKS.items():
            parser.add_lightning_class_args(callback, key)

    def _prepare(self) -> None:
        self.model.load()
        self.datamodule.set_tokenizer(self.model.tokenizer, self.model.config.chat_template)
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
    if args[:1] == ["prepare-data"]:
        from .prepare_data import prepare_data_main

        return prepare_data_main(args[1:])
    from .data import DataError
    from .models import ModelNotFoundError, ProvisioningError, UnsafeWeightsError

    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # edits run in eval mode on purpose
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoLitLoggerTip())
    if argv is None:  # LightningCLI reads sys.argv itself
        sys.argv[1:], args = renamed_flags(args), None
    try:
        EditCLI(KDPOEditor, SequentialEditDataModule, trainer_defaults=TRAINER_DEFAULTS,
                save_config_kwargs={"overwrite": True}, args=renamed_flags(args) if args is not None else None)
    except (DataError, ModelNotFoundError, ProvisioningError, UnsafeWeightsError, ValueError, FileNotFoundError) as err:
        if os.environ.get("KDPO_DEBUG"):
            raise
        print(f"kdpo-lightning: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
