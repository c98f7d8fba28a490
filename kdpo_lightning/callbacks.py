"""What is measured and written around the edits, as Lightning Callbacks (the editor itself only edits).

- `EditEvaluation`: the pre-edit snapshot, then EasyEdit's metrics after each edit or after all of them.
- `RetentionCurve`: Edit Succ. right after each edit, a curve every K edits, general capability.
- `EditResults`: the results JSON, the saved edit, TensorBoard's final scalars, the printed table.

They read the edit requests from the datamodule (`trainer.datamodule.requests`) and the model from the
editor (`pl_module.lm`). Results and the curve use the evaluation callback's rows, so list it first.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from .curves import plot_curve
from .distributed import gather_dicts
from .evaluate import EditEvaluator, format_table, write_results
from .models import weights_digest
from .saving import atomic_write, edit_path, save_edit

EVAL_MODES = ("after_all", "after_each")
PER_REQUEST = ("index", "edit_success", "rephrase", "locality_mean", "gen_edit_success_em", "gen_edit_success_contains")
"""Per-request scores a curve point keeps beside its means, for intervals over requests (bench/lifelong.py)."""


def cached_json(folder: str, key: str, compute: Callable[[], Any], write: bool = True) -> Any:
    """What `compute()` returns (plain data), or what an earlier call with the same `key` (a hex sha256 of
    everything the result depends on) left in `folder`; `write`: keep a new result there."""
    path = Path(folder) / f"{key[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    value = compute()
    if write:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(value, ensure_ascii=False))
    return value


def find_callback(trainer: L.Trainer, cls: type) -> Any:
    """The trainer's callback of type `cls`, or None."""
    return next((c for c in trainer.callbacks if isinstance(c, cls)), None)


def _requests(trainer: L.Trainer) -> list:
    requests = getattr(trainer.datamodule, "requests", None)
    if requests is None:
        raise ValueError("the evaluation callbacks read the edit requests from the datamodule's `requests`; "
                         "fit with a SequentialEditDataModule, or without these callbacks")
    return requests


def _seed(trainer: L.Trainer) -> int:
    return int(getattr(getattr(trainer.datamodule, "hparams", None), "seed", 0) or 0)


def _fitting(trainer: L.Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING


def _single(pl_module: L.LightningModule) -> bool:
    return pl_module.hparams.get("edit_mode") == "single"


class EditEvaluation(L.Callback):
    """EasyEdit's metrics: each request scored right after its own edit (`after_each`, and always in single
    mode) or every edited request after the last edit (`after_all`, the paper's protocol); `validate` and
    `test` score the whole stream (e.g. with a saved edit applied by the editor)."""

    def __init__(self, mode: str = "after_all", batch_size: int = 16, fluency: bool = True,
                 fluency_sampling: str = "greedy", max_new_tokens: int = 100, generation: bool = False,
                 generation_max_tokens: int = 50, chat_template: bool | None = None,
                 pre_edit_cache: str | None = None) -> None:
        """
        Args:
            mode: after_all or after_each.
            batch_size: prompts per evaluation forward.
            fluency: score the n-gram entropy of text generated from each prompt.
            fluency_sampling: greedy, or top_k (EasyEdit's top-5 sampling, seeded).
            max_new_tokens: tokens generated for fluency.
            generation: also score generated answers (no teacher forcing): exact match and containment of
                the target, locality as "same answer as before the edits", beside the pre-edit scores.
            generation_max_tokens: longest generated answer (50, as the Mirage paper; it stops earlier at EOS,
                a newline or a sentence's end).
            chat_template: put each prompt through the tokenizer's chat template as one user turn
                (None: when the tokenizer has one).
            pre_edit_cache: a folder that keeps the unedited model's snapshot (its locality predictions and
                generated answers) under `EditEvaluator.snapshot_key`: a later run on the same weights, requests
                and decoding (another method, say) reads it instead of generating again; `RetentionCurve` keeps
                the unedited model's capability there too. None: no cache.
        """
        self.settings = {k: v for k, v in locals().items() if k != "self"}
        if mode not in EVAL_MODES:
            raise ValueError(f"evaluation mode must be one of {EVAL_MODES}, got {mode!r}")
        self.mode, self.batch_size, self.fluency, self.fluency_sampling = mode, batch_size, fluency, fluency_sampling
        self.max_new_tokens, self.generation = max_new_tokens, generation
        self.generation_max_tokens = generation_max_tokens
        self.chat_template, self.pre_edit_cache = chat_template, pre_edit_cache
        self.evaluator: EditEvaluator | None = None
        self.weights_at_start: str | None = None
        """With `pre_edit_cache`: the `weights_digest` of the unedited model, for other caches keyed on it."""
        self.rows: dict[int, dict] = {}
        """Per scored request index: its metrics row."""
        self._final = False
        self._restored: dict | None = None

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._final, self.weights_at_start = False, None
        self.evaluator = EditEvaluator(pl_module.tokenizer, _requests(trainer), self.batch_size, self.fluency,
                                       self.fluency_sampling, self.max_new_tokens, seed=_seed(trainer),
                                       generation=self.generation, generation_max_tokens=self.generation_max_tokens,
                                       chat_template=self.chat_template)
        if self._restored is not None and _fitting(trainer):
            self.evaluator.load_state_dict(self._restored)
        else:
            self._snapshot(trainer, pl_module.lm)

    def _snapshot(self, trainer: L.Trainer, model) -> None:
        """The unedited model's snapshot, read from `pre_edit_cache` when a run on the same inputs left it there."""
        if not self.pre_edit_cache:
            self.evaluator.snapshot_pre(model)
            return

        def compute() -> dict:
            self.evaluator.snapshot_pre(model)
            return self.evaluator.state_dict()

        self.weights_at_start = weights_digest(model)
        key = self.evaluator.snapshot_key(self.weights_at_start)
        self.evaluator.load_state_dict(cached_json(self.pre_edit_cache, key, compute, trainer.is_global_zero))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _fitting(trainer):  # before the editor applies a saved edit (callbacks run first)
            self.rows = {}
            self._start(trainer, pl_module)

    on_test_start = on_validation_start

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict,
                           batch_idx: int) -> None:
        index = int(batch["index"])
        if index >= 0 and (_single(pl_module) or self.mode == "after_each"):
            self.rows[index] = self.evaluator.evaluate(pl_module.lm, [index])[0]

    def final_rows(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[int, dict]:
        """Every scored request's row at the end of the stage (computed once, gathered over processes)."""
        if not self._final:
            if not _fitting(trainer):
                indices = range(len(self.evaluator.requests))
                self.rows = {row["index"]: row for row in self.evaluator.evaluate(pl_module.lm, indices)}
            elif self.mode == "after_all" and not _single(pl_module):
                indices = sorted(pl_module.records)
                retention = find_callback(trainer, RetentionCurve)
                rows = retention.rows_after(len(indices)) if retention else None
                self.rows = {row["index"]: row for row in rows or self.evaluator.evaluate(pl_module.lm, indices)}
            self.rows, self._final = gather_dicts(trainer, self.rows), True
        return self.rows

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final_rows(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _fitting(trainer):
            self.final_rows(trainer, pl_module)

    on_test_end = on_validation_end

    def state_dict(self) -> dict:
        return {"rows": self.rows, "evaluator": self.evaluator.state_dict() if self.evaluator else None}

    def load_state_dict(self, state: dict) -> None:
        self.rows = {int(k): v for k, v in state["rows"].items()}
        self._restored = state["evaluator"]


class RetentionCurve(L.Callback):
    """What a sequence keeps: each request's Edit Succ. (and generated success) right after its own edit, a
    curve of every metric over the requests edited so far every `every_n_edits` edits, and general
    capability (multiple choice) before the first edit, on the curve and at the end."""

    def __init__(self, every_n_edits: int | None = None, capability: list[str] | None = None,
                 capability_n: int = 100, light_points: bool = False) -> None:
        """
        Args:
            every_n_edits: evaluate the requests edited so far every K edits (sequential mode); None: no curve.
            capability: any of mmlu, hellaswag, piqa, winogrande (log-likelihood multiple choice).
            capability_n: questions per benchmark, a subset seeded by the data seed.
            light_points: points before the last edit skip fluency and generate answers to the edit
                prompts only (see `EditEvaluator.evaluate`), which makes long curves affordable on a CPU.
        """
        self.settings = {k: v for k, v in locals().items() if k != "self"}
        if every_n_edits is not None and every_n_edits < 1:
            raise ValueError(f"every_n_edits must be at least 1, got {every_n_edits}")
        self.every, self.capability_names, self.capability_n = every_n_edits, list(capability or ()), capability_n
        self.light_points = light_points
        self.questions: dict[str, list] = {}
        self.curve: list[dict] = []
        self.right_after: dict[int, dict[str, float]] = {}
        self.capability_before: dict[str, float] = {}
        self._latest: tuple[int, list[dict]] = (0, [])  # (edits applied, rows) of the last full curve point

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every is not None and _single(pl_module):
            raise ValueError("retention.every_n_edits follows a sequence of edits: it needs model.edit_mode sequential")
        from .capability import load_questions

        self.questions = {n: load_questions(n, self.capability_n, _seed(trainer)) for n in self.capability_names}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.capability_before:  # after every callback's fit start: EditEvaluation has hashed the weights
            self.capability_before = self._capability_before(trainer, pl_module)

    def _capability_before(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Capability of the unedited model, kept with its snapshot in `EditEvaluation.pre_edit_cache` if set."""
        evaluation = find_callback(trainer, EditEvaluation)
        folder = evaluation.pre_edit_cache if evaluation else None
        if not folder or not self.questions:
            return self.capability(pl_module)
        weights = evaluation.weights_at_start or weights_digest(pl_module.lm)
        key = hashlib.sha256(json.dumps([{n: [dataclasses.astuple(q) for q in qs] for n, qs in self.questions.items()},
                                         evaluation.batch_size, weights]).encode()).hexdigest()
        return cached_json(folder, key, lambda: self.capability(pl_module), trainer.is_global_zero)

    def capability(self, pl_module: L.LightningModule) -> dict[str, float]:
        """{"capability/<benchmark>/<acc|acc_norm>": x100} on the current model."""
        from .capability import score

        evaluation = find_callback(pl_module.trainer, EditEvaluation)
        batch = evaluation.batch_size if evaluation else 16
        return {f"capability/{name}/{metric}": value for name, qs in self.questions.items()
                for metric, value in score(pl_module.lm, pl_module.tokenizer, name, qs, batch).items()}

    @staticmethod
    def _evaluation(trainer: L.Trainer) -> EditEvaluation:
        evaluation = find_callback(trainer, EditEvaluation)
        if evaluation is None:
            raise ValueError("the retention curve scores with the EditEvaluation callback: add it to the trainer")
        return evaluation

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict,
                           batch_idx: int) -> None:
        index = int(batch["index"])
        if self.every is None or index < 0:
            return
        evaluator = self._evaluation(trainer).evaluator
        self.right_after[index] = {"edit_success": evaluator.edit_success(pl_module.lm, [index])[0]}
        if evaluator.generation:
            self.right_after[index].update(evaluator.generated_right_after(pl_module.lm, [index])[0])
        edited = sorted(pl_module.records)
        if len(edited) % self.every:
            return
        full = not self.light_points or len(edited) >= len(evaluator.requests)
        rows = evaluator.evaluate(pl_module.lm, edited, full=full)
        if full:
            self._latest = (len(edited), rows)
        point = self.add_point(len(edited), {**evaluator.summarize(rows), **self.capability(pl_module)}, rows)
        if pl_module.logger is not None:
            scalars = {f"curve/{k}": v for k, v in point.items() if k != "edits" and isinstance(v, (int, float))}
            pl_module.logger.log_metrics(scalars, step=len(edited))

    def rows_after(self, edits: int) -> list[dict] | None:
        """The rows of the curve point at `edits` edits if it was evaluated last, in this process."""
        return self._latest[1] if self._latest[0] == edits else None

    def add_point(self, edits: int, summary: dict, rows: list[dict]) -> dict:
        """A curve point: the summary's means and, under `per_request`, each row's main scores."""
        point = {"edits": edits, **{k: v for k, v in summary.items() if k != "edits_succeeded"}}
        point["per_request"] = {key: [row.get(key) for row in rows] for key in PER_REQUEST}
        self.curve.append(point)
        return point

    def finish(self, pl_module: L.LightningModule, summary: dict, rows: list[dict], n_edits: int
               ) -> tuple[dict, list[dict]]:
        """The summary with capability at the end and the means right after each edit, the rows with their
        right-after scores; the curve gets its last point at `n_edits` if it has none there."""
        last = self.curve[-1] if self.curve else {}
        if last.get("edits") == n_edits:  # the last curve point measured this same model
            capability = {k: v for k, v in last.items() if k.startswith("capability/")}
        else:
            capability = self.capability(pl_module)
        summary = {**summary, **capability}
        if self.right_after:
            rows = [{**row, **{f"{k}_right_after": v for k, v in self.right_after.get(row["index"], {}).items()}}
                    for row in rows]
            for key in next(iter(self.right_after.values())):
                after = [r[f"{key}_right_after"] for r in rows if r.get(f"{key}_right_after") is not None]
                summary[f"{key}_right_after"] = 100.0 * sum(after) / len(after)
        if self.every is not None and n_edits and last.get("edits") != n_edits:
            self.add_point(n_edits, summary, rows)
        return summary, rows

    def state_dict(self) -> dict:
        return {"curve": self.curve, "right_after": self.right_after, "capability_before": self.capability_before}

    def load_state_dict(self, state: dict) -> None:
        self.curve, self.capability_before = state["curve"], state["capability_before"]
        self.right_after = {int(k): v for k, v in state["right_after"].items()}


class EditResults(L.Callback):
    """At the end of `fit` (or `validate`/`test`): the results JSON, the saved edit (sequential fits), the
    retention plot, TensorBoard's `final/*` scalars and hyperparameters, and the table on stdout."""

    def __init__(self, path: str | None = None) -> None:
        """path: where the results JSON goes (default: results.json in the log dir); the edit goes beside it."""
        self.path = path
        self.settings = {"path": path}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: dict,
                           batch_idx: int) -> None:
        """TensorBoard's per-edit scalars, at the edit's number in the stream."""
        record = pl_module.records.get(int(batch["index"]))
        if record is not None and pl_module.logger is not None:
            loss = record["last_loss"] if record["last_loss"] is not None else float("nan")
            pl_module.logger.log_metrics({"edit/cycles": record["cycles"], "edit/steps": record["steps"],
                                          "edit/loss": loss, "edit/success": float(record["success"])},
                                         step=int(batch["index"]))

    def resolve_path(self, trainer: L.Trainer) -> Path:
        return Path(self.path or Path(trainer.log_dir or trainer.default_root_dir) / "results.json")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = pl_module.records  # every process's, gathered by the editor at the epoch's end
        path = self._write(trainer, pl_module, sorted(records), records)
        if trainer.is_global_zero and not _single(pl_module):  # single mode rolls every edit back
            saved = save_edit(edit_path(path), pl_module.policy.model_params, self._metadata(pl_module, len(records)))
            print(f"Edited tensors saved to {portable(saved)}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not _fitting(trainer):
            self._write(trainer, pl_module, list(range(len(_requests(trainer)))), {})

    on_test_end = on_validation_end

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, indices: list[int], records: dict) -> Path:
        evaluation, retention = find_callback(trainer, EditEvaluation), find_callback(trainer, RetentionCurve)
        rows = [{"index": i} for i in indices]
        summary: dict[str, float] = {}
        if evaluation is not None:
            scored = evaluation.final_rows(trainer, pl_module)
            rows = [scored[i] for i in indices]
            summary = evaluation.evaluator.summarize(rows)
        if records:
            summary["edits_succeeded"] = 100.0 * sum(records[i]["success"] for i in indices) / len(indices)
        if retention is not None:
            summary, rows = retention.finish(pl_module, summary, rows, len(records))
        path = self.resolve_path(trainer)
        if not trainer.is_global_zero:
            return path
        hparams = _plain(dict(pl_module.hparams))
        datamodule = getattr(trainer, "datamodule", None)
        data = _plain(dict(getattr(datamodule, "hparams", {})))
        dataset = data.get("path", "")
        measured = {"evaluation": evaluation, "retention": retention, "results": self}
        config = {**hparams, "data": data, **{name: _plain(c.settings) for name, c in measured.items() if c}}
        curve = retention.curve if retention else []
        rows = [{**row, "source": portable(row["source"])} if "source" in row else row for row in rows]
        write_results(path, config=config, model=portable(pl_module.hparams.name_or_path), dataset=dataset,
                      method=pl_module.config.method, rows=rows, edit_records=[records.get(i, {}) for i in indices],
                      summary=summary, curve=curve, capability_before=retention.capability_before if retention else {})
        if curve:
            title = f"{portable(pl_module.hparams.name_or_path)}, {pl_module.config.method}, {dataset}"
            print(f"Retention curve plotted to {portable(plot_curve(curve, path.with_suffix('.curve.png'), title))}")
        if pl_module.logger is not None:
            pl_module.logger.log_metrics({f"final/{k}": v for k, v in summary.items()}, step=len(indices))
            pl_module.logger.log_hyperparams(_flat(hparams), {f"hp/{k}": v for k, v in summary.items()})
        mode = "single" if _single(pl_module) else f"sequential, {evaluation.mode if evaluation else 'no evaluation'}"
        print(f"\n{len(indices)} requests, {len(records)} edits ({pl_module.config.method}, {mode}):"
              f"\n{format_table(summary)}")
        print(f"Results written to {portable(path)}")
        return path

    @staticmethod
    def _metadata(pl_module: L.LightningModule, n_edits: int) -> dict:
        return {"base_model": portable(pl_module.hparams.name_or_path), "method": pl_module.config.method,
                "edits_applied": n_edits, "config": _plain(dict(pl_module.hparams))}


def portable(path: str | os.PathLike) -> str:
    """A path as a results file should record it: relative to the working directory when under it, `~/...`
    under the home directory, else as given (so files never carry one machine's absolute layout)."""
    text = str(path)
    if not os.path.isabs(text.split("#")[0]):
        return text
    for base, shown in ((Path.cwd(), ""), (Path.home(), "~/")):
        try:
            return shown + str(Path(text).relative_to(base))
        except ValueError:
            continue
    return text


def _plain(value: Any) -> Any:
    """Plain JSON data: nested dicts and lists kept, paths made portable, other objects as strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return portable(value)
    return value if value is None or isinstance(value, (int, float, str, bool)) else str(value)


def _flat(config: dict, prefix: str = "") -> dict:
    """{"edit/lr": ..., ...}: nested groups flattened for TensorBoard's hyperparameter table."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out
