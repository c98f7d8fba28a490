"""`KDPOEditor`: the LightningModule that edits a causal LM with a stream of edit requests.

Each batch is one edit request. In `sequential` mode edits run in order, each starting from the
weights the previous one left; in `single` mode (EasyEdit's `sequential_edit=False`) each starts
from the original weights, is evaluated, and is rolled back, so requests are independent and can be
sharded over processes (`trainer.strategy: ddp`). Usable with `lightning.Trainer(...).fit(editor,
datamodule)` or without a Trainer through `editor.edit(request)`.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .data import EditRequest, Encoded, encode
from .capability import load_questions
from .constraints import NormBound, NullSpace, cached_covariances
from .curves import Retention, plot_curve
from .evaluate import EditEvaluator, format_table, write_results
from .loop import EditConfig, EditRecord, NonFiniteError, run_edit
from .policy import Policy
from .reference import make_reference
from .saving import apply_edit, edit_path, save_edit

DEFAULT_REFERENCE = {"kdpo": "cached", "dpo": "swap", "ftm": None}
EVAL_MODES = ("after_all", "after_each")
EDIT_MODES = ("sequential", "single")


def check_edit_mode(edit_mode: str, world_size: int) -> None:
    """Sequential edits build on each other, so they cannot be split over processes."""
    if edit_mode not in EDIT_MODES:
        raise ValueError(f"edit_mode must be one of {EDIT_MODES}, got {edit_mode!r}")
    if edit_mode == "sequential" and world_size > 1:
        raise ValueError(f"sequential edits build on each other and cannot be split over {world_size} processes: "
                         "use model.edit_mode: single, or one process with model.device_map to spread a large "
                         "model over devices")


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
        nll_alpha: float = 0.0,
        nullspace_threshold: float | None = None,
        nullspace_texts: int = 1000,
        max_change: float | None = None,
        layer: int | None = None,
        trainable: list[str] | None = None,
        reference: str | None = None,
        prefix_cache: bool = True,
        dtype: str = "auto",
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[str, str] | None = None,
        trust_remote_code: bool = False,
        allow_pickle: bool = False,
        edit_mode: str = "sequential",
        eval_mode: str = "after_all",
        fluency: bool = True,
        fluency_sampling: str = "greedy",
        max_new_tokens: int = 100,
        eval_batch_size: int = 16,
        generation_metrics: bool = False,
        generation_max_tokens: int = 32,
        eval_every_n_edits: int | None = None,
        capability: list[str] | None = None,
        capability_n: int = 100,
        results_path: str | None = None,
        apply_edit: str | None = None,
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
            nll_alpha: add alpha * NLL(y_w) to the DPO loss (RPO's anchor); 0: the paper's loss.
            nullspace_threshold: project every update onto the null space of preserved keys (the
                trained projection's inputs on generic text) and of earlier edits' keys (AlphaEdit):
                directions whose covariance eigenvalue is below threshold x the largest. None: off.
            nullspace_texts: HellaSwag contexts and MMLU questions each, for the preserved keys.
            max_change: keep ||W - W_0|| <= max_change x ||W_0|| (Frobenius), W_0 the tensor before
                the first edit. None: off.
            layer: decoder layer whose MLP down-projection is trained (default: 2/3 of the depth).
            trainable: regexes of parameter names to train instead of the default tensor.
            reference: cached (KDPO default), swap (vanilla DPO default) or copy.
            prefix_cache: run the layers below the edited one once per edit.
            dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16.
            device_map: spread the model over devices with accelerate (`auto` or {module: device});
                for a model larger than one device, with sequential edits in one process.
            max_memory: per-device memory limits for `device_map: auto`, e.g. {0: "70GiB", "cpu": "200GiB"}.
            trust_remote_code: allow model code from the model directory.
            allow_pickle: allow pickled (non-safetensors) weights.
            edit_mode: sequential (each edit starts from the previous one; the paper's protocol) or
                single (each edit starts from the original weights, is evaluated, then rolled back).
            eval_mode: after_all (apply every edit, then evaluate all; the paper's protocol) or
                after_each (evaluate each request right after its own edit). Single mode is always
                evaluated right after each edit.
            fluency: score the n-gram entropy of text generated from each prompt.
            fluency_sampling: greedy, or top_k (EasyEdit's top-5 sampling, seeded).
            max_new_tokens: tokens generated for fluency.
            eval_batch_size: prompts per evaluation forward.
            generation_metrics: also score greedy generated answers (no teacher forcing): exact match
                and containment of the target, locality as "same answer as before the edits".
            generation_max_tokens: longest generated answer (it also stops at EOS or a newline).
            eval_every_n_edits: sequential mode: evaluate the requests edited so far every K edits,
                giving a retention curve (results JSON, TensorBoard `curve/*`, a PNG beside the results),
                and record each request's Edit Succ. right after its own edit.
            capability: general benchmarks scored before the first edit, on the curve and at the end:
                any of mmlu, hellaswag, piqa, winogrande (log-likelihood multiple choice).
            capability_n: questions per benchmark, a subset seeded by the data seed.
            results_path: where the results JSON goes (default: results.json in the log dir).
            apply_edit: a saved edit (.safetensors) to apply before `validate`/`test` evaluate it.
        """
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold only the trained tensors
        self.config = EditConfig(method, n_cycles, n_steps, lr, beta, mask_where_equal, early_stop, nll_alpha)
        self.reference_name = reference if reference is not None else DEFAULT_REFERENCE[method]
        if method == "dpo" and self.reference_name == "cached":
            raise ValueError("vanilla DPO scores y_l in a new context every cycle: use reference 'swap' or 'copy'")
        if self.reference_name is not None:
            make_reference(self.reference_name)  # fail on a bad name now, not at the first edit
        check_edit_mode(edit_mode, 1)
        if eval_every_n_edits is not None and edit_mode == "single":
            raise ValueError("eval_every_n_edits follows a sequence of edits: it needs edit_mode sequential")
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}")
        self.lm: nn.Module | None = None
        self.tokenizer = None
        self.records: dict[int, dict[str, Any]] = {}
        """Per edited request index: its edit record (cycles, steps, losses, success, seconds)."""
        self.rows: dict[int, dict[str, Any]] = {}
        """Per evaluated request index: its metrics row."""
        self.n_succeeded = 0
        """Edits in `records` that succeeded, counted as they land (for the progress bar)."""
        self._original: dict[str, Tensor] | None = None
        """Single mode: the trained tensors before any edit, restored after each one."""
        self.retention: Retention | None = None
        """Edit Succ. right after each edit, the curve and capability scores (set up at fit start)."""
        self.evaluator: EditEvaluator | None = None
        self._restored: dict[str, Any] = {}

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
                                          allow_pickle=hp.allow_pickle, device_map=hp.device_map,
                                          max_memory=hp.max_memory)
            self._attach(model, tokenizer)

    def _attach(self, model: nn.Module, tokenizer) -> None:
        if len(set(getattr(model, "hf_device_map", {}).values())) > 1:
            self.__dict__["lm"] = model.eval()  # placed by accelerate: not a submodule Lightning would move
        else:
            self.lm = model.eval()
        self.tokenizer = tokenizer
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
        self._ensure_constraints()
        encoded = request if isinstance(request, Encoded) else self.encode(request)
        input_ids = torch.tensor([encoded.input_ids], device=self._lm_device())
        optimizer = torch.optim.Adam(self.policy.params.values(), lr=self.config.lr)
        return self._edit(input_ids, encoded.target_start, optimizer, Tensor.backward)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        index = int(batch["index"])
        if index < 0:  # padding: every process runs the same number of steps
            return
        optimizer = self.optimizers()
        optimizer.optimizer.state.clear()  # a fresh Adam for every edit, as in the paper
        with self._independent_of_other_processes():
            record = self._edit(batch["input_ids"][None], int(batch["target_start"]), optimizer, self.manual_backward)
        self.records[index] = {**record.as_dict(), "rank": self.global_rank}  # the process that made it
        if self.trainer.world_size == 1 and hasattr(self.trainer.datamodule, "mark_done"):  # resume position
            self.trainer.datamodule.mark_done(index)
        if self._single() or self.hparams.eval_mode == "after_each":
            self.rows[index] = self.evaluator.evaluate(self.lm, [index])[0]
        if self._single():
            self.policy.load_values(self._original)
        point = self.retention.after_edit(self.lm, self.tokenizer, self.evaluator, index, sorted(self.records))
        if point is not None and self.logger is not None:
            self.logger.log_metrics({f"curve/{k}": v for k, v in point.items() if k != "edits"}, step=point["edits"])
        self.n_succeeded += record.success
        self.log_dict({"edit/cycles": float(record.cycles), "edit/steps": float(record.steps),
                       "edit/loss": record.last_loss if record.last_loss is not None else float("nan"),
                       "edit/success": float(record.success)}, on_step=True, batch_size=1)
        self.log("success_rate", self.n_succeeded / len(self.records), prog_bar=True, on_step=True, batch_size=1)

    # Evaluation: pre-edit snapshot at the start, scores after each edit or after all of them.

    def on_fit_start(self) -> None:
        check_edit_mode(self.hparams.edit_mode, self.trainer.world_size)
        self._ensure_constraints()
        self._check_lengths()
        self._start_evaluation()
        if self._single():
            self._original = self.policy.original_values()
        if not self.retention.capability_before:
            self.retention.capability_before = self.retention.capability(self.lm, self.tokenizer)

    def on_validation_start(self) -> None:
        if not self._fitting():
            self._evaluate_saved_edit()

    on_test_start = on_validation_start

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Nothing per batch: `validate`/`test` score the whole stream at the end."""

    test_step = validation_step

    def on_train_end(self) -> None:
        if self.hparams.eval_mode == "after_all" and not self._single():
            indices = sorted(self.records)
            rows = self.retention.rows_after(len(indices)) or self.evaluator.evaluate(self.lm, indices)
            self.rows = {row["index"]: row for row in rows}
        self._gather()
        indices = sorted(self.records)
        self._finish(indices)
        if self.trainer.is_global_zero and not self._single():  # single mode rolls every edit back
            path = edit_path(self._results_path())
            save_edit(path, self.policy.model_params, self._metadata(len(indices)))
            print(f"Edited tensors saved to {path}")

    def _single(self) -> bool:
        return self.hparams.edit_mode == "single"

    def _independent_of_other_processes(self):
        """Under DDP each process edits its own requests on its own replica: no gradient averaging."""
        model = self.trainer.strategy.model
        return model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext()

    def _gather(self) -> None:
        """Under DDP, give every process all records and metric rows (each request comes from one)."""
        if self.trainer.world_size == 1 or not dist.is_initialized():
            return
        parts = [None] * self.trainer.world_size
        dist.all_gather_object(parts, (self.records, self.rows))
        for records, rows in parts:
            self.records.update(records)
            self.rows.update(rows)

    def on_validation_end(self) -> None:
        if self._fitting():  # a val loop inside `fit` has nothing to do: fit evaluates at its end
            return
        indices = list(range(len(self.trainer.datamodule.requests)))
        self.rows = {row["index"]: row for row in self.evaluator.evaluate(self.lm, indices)}
        self._finish(indices)

    on_test_end = on_validation_end

    def _fitting(self) -> bool:
        return self.trainer.state.fn == TrainerFn.FITTING

    def _start_evaluation(self) -> None:
        hp = self.hparams
        self.evaluator = EditEvaluator(self.tokenizer, self.trainer.datamodule.requests, hp.eval_batch_size,
                                       hp.fluency, hp.fluency_sampling, hp.max_new_tokens, seed=self._seed(),
                                       generation=hp.generation_metrics, generation_max_tokens=hp.generation_max_tokens)
        questions = {name: load_questions(name, hp.capability_n, self._seed()) for name in hp.capability or ()}
        self.retention = Retention(hp.eval_every_n_edits, questions, hp.eval_batch_size)
        if "evaluator" in self._restored:
            self.evaluator.load_state_dict(self._restored["evaluator"])
            self.retention.load_state_dict(self._restored["retention"])
        else:
            self.evaluator.snapshot_pre(self.lm)

    def _check_lengths(self) -> None:
        """Fail before the first edit if any c+y_w is longer than the model's context."""
        limit = getattr(self.lm.config, "max_position_embeddings", None) or getattr(self.lm.config, "n_positions", None)
        dm = self.trainer.datamodule
        for row in dm.edits() if limit else ():
            if len(row["input_ids"]) > limit:
                source = dm.requests[int(row["index"])].source
                raise ValueError(f"{source}: prompt + target is {len(row['input_ids'])} tokens, longer than the "
                                 f"model's context of {limit}")

    def _evaluate_saved_edit(self) -> None:
        self._start_evaluation()
        if self.hparams.apply_edit:
            apply_edit(self.lm, self.hparams.apply_edit)

    def _finish(self, indices: list[int]) -> None:
        """Summarize, write the results JSON, log the final metrics, print the table."""
        retention = self.retention
        rows, records = [self.rows[i] for i in indices], [self.records.get(i, {}) for i in indices]
        last = retention.curve[-1] if retention.curve and self._fitting() else {}
        if last.get("edits") == len(self.records):  # the last curve point measured this same model
            capability = {k: v for k, v in last.items() if k.startswith("capability/")}
        else:
            capability = retention.capability(self.lm, self.tokenizer)
        summary = {**self.evaluator.summarize(rows), **capability}
        if self.records:
            summary["edits_succeeded"] = 100.0 * sum(r["success"] for r in records) / len(records)
        if retention.right_after:
            rows = [{**row, "edit_success_right_after": retention.right_after.get(row["index"])} for row in rows]
            after = [r["edit_success_right_after"] for r in rows if r["edit_success_right_after"] is not None]
            summary["edit_success_right_after"] = 100.0 * sum(after) / len(after)
        if retention.every is not None and self._fitting() and (not retention.curve or
                                                                 retention.curve[-1]["edits"] != len(self.records)):
            retention.add_point(len(self.records), summary)
        if not self.trainer.is_global_zero:
            return
        dm = self.trainer.datamodule
        path = write_results(self._results_path(), config=dict(self.hparams) | {"data": dict(dm.hparams)},
                             model=self.hparams.name_or_path, dataset=str(dm.hparams.path),
                             method=self.hparams.method, rows=rows, edit_records=records, summary=summary,
                             curve=retention.curve, capability_before=retention.capability_before)
        if retention.curve:
            title = f"{self.hparams.name_or_path}, {self.hparams.method}, {dm.hparams.path}"
            print(f"Retention curve plotted to {plot_curve(retention.curve, Path(path).with_suffix('.curve.png'), title)}")
        if self.logger is not None:
            self.logger.log_metrics({f"final/{k}": v for k, v in summary.items()}, step=len(indices))
            self.logger.log_hyperparams(self._plain_hparams(), {f"hp/{k}": v for k, v in summary.items()})
        mode = "single" if self._single() else f"sequential, {self.hparams.eval_mode}"
        print(f"\n{len(indices)} requests, {len(self.records)} edits ({self.hparams.method}, {mode}):"
              f"\n{format_table(summary)}")
        print(f"Results written to {path}")

    def _results_path(self) -> str:
        if self.hparams.results_path:
            return self.hparams.results_path
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        return str(Path(log_dir) / "results.json")

    def _metadata(self, n_edits: int) -> dict:
        return {"base_model": self.hparams.name_or_path, "method": self.hparams.method,
                "edits_applied": n_edits, "config": self._plain_hparams()}

    def _plain_hparams(self) -> dict:
        return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in self.hparams.items()}

    def _seed(self) -> int:
        return int(getattr(self.trainer.datamodule.hparams, "seed", 0) or 0)

    # Resuming: a checkpoint holds only the trained tensors, the records and the evaluator's snapshot.

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {f"lm.{k}": v.detach().cpu() for k, v in self.policy.params.items()}
        checkpoint["kdpo"] = {"records": self.records, "rows": self.rows, "evaluator": self.evaluator.state_dict(),
                              "retention": self.retention.state_dict(), "rng": torch.get_rng_state(),
                              "constraints": [c.state_dict() for c in self.policy.constraints]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.policy.load_values({k.removeprefix("lm."): v for k, v in checkpoint.pop("state_dict").items()})
        checkpoint["state_dict"] = {}  # loaded above, into the fp32 masters as well as the model
        state = checkpoint["kdpo"]
        self.records = {int(k): v for k, v in state["records"].items()}
        self.n_succeeded = sum(r["success"] for r in self.records.values())
        self.rows = {int(k): v for k, v in state["rows"].items()}
        self._restored = {"evaluator": state["evaluator"], "retention": state["retention"],
                          "constraints": state["constraints"]}
        torch.set_rng_state(state["rng"])

    def _edit(self, input_ids: Tensor, target_start: int, optimizer, backward) -> EditRecord:
        """Run one edit; on a non-finite loss or weight, restore the pre-edit tensors and mark it failed."""
        before = self.policy.original_values()
        try:
            record = run_edit(self.policy, self.reference, input_ids, target_start, self.config, optimizer, backward)
        except NonFiniteError as err:
            self.policy.load_values(before)
            return EditRecord(failed=str(err))
        for constraint in self.policy.constraints:
            if isinstance(constraint, NullSpace) and not self._single():  # protect this edit from the next ones
                constraint.add_edit(input_ids, target_start)
        return record

    def _ensure_constraints(self) -> None:
        """Build the update constraints once (the null space's covariance is cached on disk)."""
        hp = self.hparams
        if self.policy.constraints or (hp.nullspace_threshold is None and hp.max_change is None):
            return
        if hp.nullspace_threshold is not None:
            covariances = cached_covariances(self.lm, self.tokenizer, list(self.policy.params), hp.nullspace_texts,
                                             hp.name_or_path, self._lm_device())
            self.policy.constraints.append(NullSpace(self.lm, covariances, hp.nullspace_threshold))
        if hp.max_change is not None:
            self.policy.constraints.append(NormBound(self.policy.params, hp.max_change))
        for constraint, state in zip(self.policy.constraints, self._restored.get("constraints", [])):
            constraint.load_state_dict(state)

    def _lm_device(self) -> torch.device:
        return next(self.lm.parameters()).device
