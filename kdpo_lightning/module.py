"""`KDPOEditor`: the LightningModule that edits a causal LM with a stream of edit requests.

Each batch is one edit request; edits run in order, each starting from the weights the previous
one left (sequential editing). Usable with `lightning.Trainer(...).fit(editor, datamodule)` or
without a Trainer through `editor.edit(request)`.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from .data import EditRequest, Encoded, encode
from .loop import EditConfig, EditRecord, NonFiniteError, run_edit
from .policy import Policy
from .reference import make_reference

DEFAULT_REFERENCE = {"kdpo": "cached", "dpo": "swap", "ftm": None}


class KDPOEditor(L.LightningModule):
    """Sequential knowledge editing with KDPO (or vanilla DPO / FT-M) on one trained tensor."""

    def __init__(
        self,
        name_or_path: str = "smollm2-135m",
        method: str = "kdpo",
        n_cycles: int = 10,
        n_steps: int = 8,
        lr: float = 1e-4,
        beta: float = 0.1,
        mask_where_equal: bool = True,
        early_stop: bool = True,
        layer: int | None = None,
        trainable: list[str] | None = None,
        reference: str | None = None,
        prefix_cache: bool = True,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        """
        Args:
            name_or_path: local model directory, a hub id already in the local cache, or `smollm2-135m`.
            method: kdpo, dpo (vanilla, free-running y_l) or ftm.
            n_cycles: most cycles per edit (paper: 10-20).
            n_steps: Adam steps per cycle (paper: 8).
            lr: Adam learning rate, a fresh Adam per edit (paper: 1e-4).
            beta: DPO temperature (paper: 0.1).
            mask_where_equal: drop positions where y_w == y_l from the DPO sums.
            early_stop: stop an edit once y_l == y_w (False: fixed schedule, for benchmarks).
            layer: decoder layer whose MLP down-projection is trained (default: 2/3 of the depth).
            trainable: regexes of parameter names to train instead of the default tensor.
            reference: cached (KDPO default), swap (vanilla DPO default) or copy.
            prefix_cache: run the layers below the edited one once per edit.
            dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.
            trust_remote_code: allow model code from the model directory.
            allow_pickle: allow pickled (non-safetensors) weights.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.config = EditConfig(method, n_cycles, n_steps, lr, beta, mask_where_equal, early_stop)
        self.reference_name = reference if reference is not None else DEFAULT_REFERENCE[method]
        if method == "dpo" and self.reference_name == "cached":
            raise ValueError("vanilla DPO scores y_l in a new context every cycle: use reference 'swap' or 'copy'")
        if self.reference_name is not None:
            make_reference(self.reference_name)  # fail on a bad name now, not at the first edit
        self.lm: nn.Module | None = None
        self.tokenizer = None
        self.records: dict[int, dict[str, Any]] = {}

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, **hparams: Any) -> "KDPOEditor":
        """Wrap an already loaded model and tokenizer (no loading from disk)."""
        editor = cls(name_or_path=getattr(model.config, "_name_or_path", "") or "<in-memory>", **hparams)
        editor._attach(model, tokenizer)
        return editor

    def load(self) -> None:
        """Load the model and tokenizer once (lazily, so `--print_config` and `__init__` stay cheap)."""
        if self.lm is None:
            from .models import load_model

            hp = self.hparams
            model, tokenizer = load_model(hp.name_or_path, dtype=hp.dtype, trust_remote_code=hp.trust_remote_code,
                                          allow_pickle=hp.allow_pickle)
            self._attach(model, tokenizer)

    def _attach(self, model: nn.Module, tokenizer) -> None:
        self.lm, self.tokenizer = model.eval(), tokenizer
        hp = self.hparams
        self.policy = Policy(model, trainable=hp.trainable, layer=hp.layer, prefix_cache=hp.prefix_cache)
        self.reference = make_reference(self.reference_name) if self.reference_name else None

    def train(self, mode: bool = True) -> "KDPOEditor":
        """Edits run with the LM in eval mode (no dropout): the edit must be deterministic and
        match the plain-PyTorch path, whatever mode Lightning puts the module in."""
        super().train(mode)
        if self.lm is not None:
            self.lm.eval()
        return self

    def configure_model(self) -> None:
        self.load()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.policy.params.values(), lr=self.config.lr)

    def encode(self, request: EditRequest) -> Encoded:
        """The request's c+y_w tokens, by the rule the metrics use too."""
        return encode(self.tokenizer, request.prompt, request.target_new)

    def edit(self, request: EditRequest | Encoded) -> EditRecord:
        """Apply one edit without a Trainer (plain PyTorch), with a fresh Adam. Returns its record."""
        self.load()
        encoded = request if isinstance(request, Encoded) else self.encode(request)
        input_ids = torch.tensor([encoded.input_ids], device=self._lm_device())
        optimizer = torch.optim.Adam(self.policy.params.values(), lr=self.config.lr)
        return self._edit(input_ids, encoded.target_start, optimizer, Tensor.backward)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer.optimizer.state.clear()  # a fresh Adam for every edit, as in the paper
        record = self._edit(batch["input_ids"][None], int(batch["target_start"]), optimizer, self.manual_backward)
        self.records[int(batch["index"])] = record.as_dict()
        successes = sum(r["success"] for r in self.records.values())
        self.log_dict({"edit/cycles": float(record.cycles), "edit/steps": float(record.steps),
                       "edit/loss": record.last_loss if record.last_loss is not None else 0.0,
                       "edit/success": float(record.success)}, on_step=True, batch_size=1)
        self.log("success_rate", successes / len(self.records), prog_bar=True, on_step=True, batch_size=1)

    def _edit(self, input_ids: Tensor, target_start: int, optimizer, backward) -> EditRecord:
        """Run one edit; on a non-finite loss or weight, restore the pre-edit tensors and mark it failed."""
        before = self.policy.original_values()
        try:
            return run_edit(self.policy, self.reference, input_ids, target_start, self.config, optimizer, backward)
        except NonFiniteError as err:
            self.policy.load_values(before)
            return EditRecord(failed=str(err))

    def _lm_device(self) -> torch.device:
        return next(self.lm.parameters()).device
