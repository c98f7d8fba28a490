"""`KDPOEditor`: the LightningModule that edits a causal LM, one request `{"index", "input_ids", "target_start"}`
per batch. `sequential` edits build on each other; `single` ones (EasyEdit's `sequential_edit=False`) are rolled
back after the batch, once callbacks scored them, and can be sharded over processes. Evaluation, curves and files
are Callbacks (`callbacks.py`); `close()` gives the model back as it came."""
from __future__ import annotations

import os
import re
from dataclasses import asdict
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
import torch
from torch import Tensor, nn

from .config import GROUPS, Constraints, Loading, Target, check_edit_mode, group_flat
from .constraints import NullSpace, build_constraints
from .data import EditRequest, Encoded, encode
from .distributed import gather_dicts, independent_of_other_processes
from .locate import LOCATE_METHODS, LocateConfig, LocateThenEdit, cached_locator, trained_names
from .loop import EditConfig, EditRecord, NonFiniteError, make_optimizer, run_edit
from .models import load_model, warn_if_slow_on_cpu
from .policy import Policy
from .reference import make_reference, reference_for
from .replay import Rehearsal
from .saving import apply_edit

class KDPOEditor(L.LightningModule):
    """Knowledge editing with KDPO (or vanilla DPO / FT-M) on one trained tensor of a causal LM."""

    def __init__(self, name_or_path: str = "smollm2-135m", edit: EditConfig = EditConfig(), target: Target = Target(),
                 constraints: Constraints = Constraints(), locate: LocateConfig = LocateConfig(),
                 load: Loading = Loading(), edit_mode: str = "sequential", batch_size: int = 1,
                 apply_edit: str | None = None) -> None:
        """
        Args:
            name_or_path: local model directory, a Hugging Face hub id, or `smollm2-135m` (the demo model).
            edit: the method and its schedule (paper: kdpo, 10 cycles of 8 Adam steps, lr 1e-4, beta 0.1).
            target: which tensor trains (paper: layer 21's MLP down-projection) and how forwards run.
            constraints: null space / norm bound against forgetting in long sequences (off: the paper).
            locate: MEMIT/AlphaEdit's settings (`edit.method: memit | alphaedit`).
            load: dtype and placement of the model.
            edit_mode: sequential (the paper's protocol) or single (each edit rolled back once scored).
            batch_size: requests MEMIT/AlphaEdit write at once (1: the same stream as KDPO).
            apply_edit: a saved edit (.safetensors) to apply before `validate`/`test` evaluate it.
        """
        super().__init__()
        groups = {"edit": edit, "target": target, "constraints": constraints, "locate": locate, "load": load}
        self.save_hyperparameters({"name_or_path": name_or_path, **{k: asdict(v) for k, v in groups.items()},
                                   "edit_mode": edit_mode, "batch_size": batch_size, "apply_edit": apply_edit})
        self.automatic_optimization = False  # hparams above are plain data: checkpoints load with weights_only
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.config, self.target, self.limits, self.loading, self.locate = edit, target, constraints, load, locate
        if batch_size != 1 and (edit.method not in LOCATE_METHODS or edit_mode == "single"):
            raise ValueError(f"batch_size {batch_size}: only MEMIT and AlphaEdit write several requests at once, "
                             "in sequential mode")
        self.reference_name = reference_for(edit.method, target.reference)
        check_edit_mode(edit_mode, 1)
        self.lm: nn.Module | None = None
        self.tokenizer = None
        self.policy: Policy | None = None
        self.records: dict[int, dict[str, Any]] = {}  # per edited request: cycles, steps, losses, success, ...
        self._original: dict[str, Tensor] | None = None  # single mode: the trained tensors before any edit
        self.locator: LocateThenEdit | None = None
        self.rehearsal = Rehearsal(seed=int(os.environ.get("PL_GLOBAL_SEED", 0)))  # earlier edits, for `edit.replay`
        self._pending: list[int] = []
        self._stay, self._was_training = False, None  # skip the next teardown move; the model's own mode
        self._restored: dict[str, Any] = {}

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, **hparams: Any) -> "KDPOEditor":
        """Wrap an already loaded model and tokenizer; `hparams` may use the flat names (`lr=1e-3`)."""
        name = getattr(model.config, "_name_or_path", "") or "<in-memory>"
        editor = cls(name_or_path=name, **group_flat(GROUPS, hparams))
        editor._attach(model, tokenizer)
        return editor

    def load(self) -> None:
        """Load the model and tokenizer once (lazily, so `--print_config` and `__init__` stay cheap)."""
        if self.lm is None:
            model, tokenizer = load_model(self.hparams.name_or_path, **self.loading.load_model_kwargs())
            self._attach(model, tokenizer)

    configure_model = load

    def _attach(self, model: nn.Module, tokenizer) -> None:
        self._was_training = model.training
        warn_if_slow_on_cpu(model)
        if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
            self.__dict__["lm"] = model.eval()  # placed by accelerate: not a submodule Lightning would move
        else:
            self.lm = model.eval()
        self.tokenizer = tokenizer
        trainable = self.target.trainable
        if self.config.method in LOCATE_METHODS:  # MEMIT/AlphaEdit write several layers' projections
            trainable = [re.escape(name) for name in trained_names(model, self.locate)]
        self.policy = Policy(model, trainable=trainable, layer=self.target.layer, prefix_cache=self.target.prefix_cache)
        self.reference = make_reference(self.reference_name) if self.reference_name else None

    def close(self) -> None:
        """Give the model back as it came (hooks, `requires_grad` flags, train/eval mode); the edits stay."""
        if self.policy is not None:
            self.policy.close()
            self.lm.train(bool(self._was_training))
            self.policy = None

    def __enter__(self) -> "KDPOEditor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def train(self, mode: bool = True) -> "KDPOEditor":
        """Edits run with the LM in eval mode (no dropout), whatever mode Lightning puts the module in."""
        super().train(mode)
        if self.lm is not None and self.policy is not None:
            self.lm.eval()
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.policy.params.values(), self.config.lr)

    def encode(self, request: EditRequest) -> Encoded:
        """The request's c+y_w tokens, by the rule the metrics use too."""
        return encode(self.tokenizer, request.prompt, request.target_new, self.config.chat_template)

    def edit(self, request: EditRequest | Encoded) -> EditRecord:
        """Apply one edit without a Trainer (plain PyTorch), with a fresh Adam. Returns its record."""
        self.load()
        self._ensure_constraints()
        if self.config.method in LOCATE_METHODS:
            return self._locate_edit([request])[0]
        encoded = request if isinstance(request, Encoded) else self.encode(request)
        input_ids = torch.tensor([encoded.input_ids], device=self.lm.device)
        optimizer = make_optimizer(self.policy.params.values(), self.config.lr)
        return self._edit(input_ids, encoded.target_start, optimizer, Tensor.backward)

    def on_fit_start(self) -> None:
        check_edit_mode(self.hparams.edit_mode, self.trainer.world_size)
        if hasattr(self.trainer.datamodule, "check_lengths"):  # fail before any edit, not at the long one
            self.trainer.datamodule.check_lengths(self.lm.config)
        self._ensure_constraints()
        if self.hparams.edit_mode == "single":
            self._original = self.policy.original_values()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        index = int(batch["index"])
        if index < 0:  # padding: every process runs the same number of steps
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.config.method in LOCATE_METHODS:  # a batch of requests, written once it is full or the stream ends
            self._pending.append(index)
            if len(self._pending) < self.hparams.batch_size and index + 1 < len(datamodule.requests):
                return
            done = dict(zip(self._pending, self._locate_edit([datamodule.requests[i] for i in self._pending])))
            self._pending = []
        else:
            optimizer = self.optimizers()
            optimizer.optimizer.state.clear()  # a fresh Adam for every edit, as in the paper
            with independent_of_other_processes(self.trainer):
                ids, start = batch["input_ids"][None], int(batch["target_start"])
                done = {index: self._edit(ids, start, optimizer, self.manual_backward)}
        for index, record in done.items():
            self.records[index] = {**record.as_dict(), "rank": self.global_rank}  # the process that made it
            if self.trainer.world_size == 1 and hasattr(datamodule, "mark_done"):  # resume position
                datamodule.mark_done(index)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        """Single mode: roll the edit back once the callbacks (which run first) have scored it."""
        if self._original is not None:
            self.policy.load_values(self._original)

    def on_train_epoch_end(self) -> None:
        """Under DDP, give every process all edit records (each made by one) before callbacks write them."""
        self.records = gather_dicts(self.trainer, self.records)
        self._stay = not self.loading.offload_after_fit

    def cpu(self) -> "KDPOEditor":
        """Lightning's teardown after a fit moves the module to the CPU: skipped unless `load.offload_after_fit`."""
        if self._stay:
            self._stay = False
            return self
        return super().cpu()

    def on_validation_start(self) -> None:
        """`validate`/`test` score a saved edit: apply it (callbacks snapshot the model before, as they run first)."""
        if self.hparams.apply_edit and self.trainer.state.fn != TrainerFn.FITTING:
            apply_edit(self.lm, self.hparams.apply_edit)

    on_test_start = on_validation_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Nothing per batch: `validate`/`test` score the whole stream in the evaluation callback."""

    test_step = validation_step

    # Resuming: a checkpoint holds only the trained tensors, the records, the RNG and the constraints (no Adam state).

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        values = self._original if self._original is not None else self.policy.original_values()  # single: rolled back
        checkpoint["state_dict"] = {f"lm.{k}": v.detach().cpu() for k, v in values.items()}
        checkpoint["optimizer_states"] = []  # every edit starts a fresh Adam: its moments were twice the tensor
        checkpoint["kdpo"] = {"records": self.records, "rng": torch.get_rng_state(),
                              "constraints": [c.state_dict() for c in self.policy.constraints],
                              "locate": self.locator.state_dict() if self.locator else None,
                              "rehearsal": self.rehearsal.state_dict()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.policy.load_values({k.removeprefix("lm."): v for k, v in checkpoint.pop("state_dict").items()})
        checkpoint["state_dict"] = {}  # loaded above, into the fp32 masters as well as the model
        state = checkpoint["kdpo"]
        self.records = {int(k): v for k, v in state["records"].items()}
        self._restored = state
        self.rehearsal.load_state_dict(state["rehearsal"])
        torch.set_rng_state(state["rng"])

    def _edit(self, input_ids: Tensor, target_start: int, optimizer, backward) -> EditRecord:
        """Run one edit; on a non-finite loss or weight, restore the pre-edit tensors and mark it failed."""
        if self.config.train_stop:  # y_w and then the stop token: the model learns to end its answer there
            input_ids = torch.cat([input_ids, input_ids.new_tensor([[self.tokenizer.eos_token_id]])], dim=1)
        sequential = self._original is None
        replays = self.rehearsal.sample(self.config.replay, input_ids.device, self.config.replay_pool, self.policy)
        before = self.policy.original_values()
        try:
            record = run_edit(self.policy, self.reference, input_ids, target_start, self.config, optimizer, backward,
                              replays)
        except NonFiniteError as err:
            self.policy.load_values(before)
            return EditRecord(failed=str(err))
        if sequential and self.config.replay:
            self.rehearsal.add(input_ids, target_start)
        for constraint in self.policy.constraints:
            if isinstance(constraint, NullSpace) and sequential:  # protect this edit from the next ones
                constraint.add_edit(input_ids, target_start)
        return record

    def _locate_edit(self, requests: list[EditRequest]) -> list[EditRecord]:
        """MEMIT/AlphaEdit: write the requests in closed form (the preserved keys' covariance is cached on disk)."""
        args = (self.config.method, self.locate, self.limits.nullspace_texts, self.hparams.name_or_path)
        self.locator = self.locator or cached_locator(self.lm, self.tokenizer, *args, self._restored.get("locate"))
        records = self.locator.edit(requests)
        self.policy.sync_masters()  # the fp32 masters follow what was written into the model
        return records

    def _ensure_constraints(self) -> None:
        """Build the update constraints once, restoring their state from a checkpoint."""
        self.policy.constraints = self.policy.constraints or build_constraints(
            self.lm, self.tokenizer, self.policy.params, self.limits, self.hparams.name_or_path,
            self._restored.get("constraints", []))
