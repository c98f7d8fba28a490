"""Batched evaluation of edited models, EasyEdit's way, and the results file.

Sequences are padded on the LEFT, as EasyEdit does, with an attention mask and ``position_ids``
counted from the mask, so a padded row gets the logits of the same row run alone. Scoring tokens
come from :func:`kdpo_lightning.data.encode`, the rule the training loss uses.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from kdpo_lightning.data import EditRequest, encode
from kdpo_lightning.generation import (
    SAMPLINGS, by_length, contains, exact_match, generate_texts, greedy_answers, has_chat_template, left_pad,
    model_device, pad_token_id,
)
from kdpo_lightning.saving import atomic_write
from kdpo_lightning.metrics import (
    EditSuccess, Fluency, Generalization, Locality, Portability, ngram_entropy, probe_accuracy,
    token_accuracy,
)

@torch.no_grad()
def teacher_forced_argmax(model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[str, str]],
                          batch_size: int = 16) -> list[tuple[Tensor, Tensor]]:
    """Teacher-forced argmax over each answer, as EasyEdit's ``test_prediction_acc``.

    Args:
        pairs: ``(prompt, answer)``; each is tokenized with :func:`~kdpo_lightning.data.encode`.

    Returns:
        Per pair, on CPU, ``(pred_ids (L,), label_ids (L,))`` with ``L`` answer tokens: the argmax
        at positions ``target_start - 1 .. T - 2`` and the answer tokens they predict.
    """
    encoded = [encode(tokenizer, prompt, answer) for prompt, answer in pairs]
    out: list[tuple[Tensor, Tensor]] = [None] * len(encoded)  # type: ignore[list-item]
    pad_id, device = pad_token_id(tokenizer), model_device(model)
    for batch in by_length([len(e.input_ids) for e in encoded], batch_size):
        rows = [encoded[i].input_ids for i in batch]
        ids, mask, positions = left_pad(rows, pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        preds = logits.argmax(-1).cpu()  # (B, T)
        ids, width = ids.cpu(), ids.shape[1]
        for row, i in enumerate(batch):
            start = width - len(rows[row]) + encoded[i].target_start
            out[i] = (preds[row, start - 1:width - 1], ids[row, start:])
    return out


def _jobs(request: EditRequest) -> list[tuple[str, str, str, str]]:
    """``(field, kind, prompt, answer)`` for every scored prompt of a request; probe answers are
    their first alias, and probes with a blank answer are dropped (as EasyEdit does)."""
    jobs = [("edit_success", "", request.prompt, request.target_new)]
    jobs += [("rephrase", "", prompt, request.target_new) for prompt in request.rephrase]
    for field, probes in (("portability", request.portability), ("locality", request.locality)):
        for kind, items in probes.items():
            jobs += [(field, kind, prompt, answers[0]) for prompt, answers in items
                     if answers and answers[0].strip()]
    return jobs


GENERATION_KEYS = (*(f"gen_{field}_{score}" for field in ("edit_success", "rephrase", "portability")
                     for score in ("em", "contains")), "gen_locality")
PRE_GENERATION_KEYS = tuple(f"pre_{key}" for key in GENERATION_KEYS)
"""The same scores of the unedited model's answers (``pre_gen_locality`` is 1 by definition)."""


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Runs the block with the model in eval mode (no dropout), then restores its mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class EditEvaluator:
    """Scores edit requests on a model; keeps the pre-edit locality predictions.

    Call :meth:`snapshot_pre` once on the unedited model, then :meth:`evaluate` after editing and
    :meth:`summarize` on its rows.

    With `generation`, rows also score greedy generated answers (see
    :func:`~kdpo_lightning.generation.greedy_answers`): each prompt goes through the tokenizer's chat
    template as one user turn when `chat_template` is true (None: exactly when the tokenizer has
    one), and decoding stops at a stop token, a newline or the end of the first sentence, at most
    `generation_max_tokens` new tokens. Teacher-forced scores always use the bare prompt.
    """

    def __init__(self, tokenizer, requests: Sequence[EditRequest], batch_size: int = 16, fluency: bool = True,
                 fluency_sampling: str = "greedy", max_new_tokens: int = 100, seed: int = 0,
                 generation: bool = False, generation_max_tokens: int = 50, chat_template: bool | None = None) -> None:
        if fluency_sampling not in SAMPLINGS:
            raise ValueError(f"fluency_sampling must be one of {SAMPLINGS}, got {fluency_sampling!r}")
        if generation_max_tokens < 1:
            raise ValueError(f"generation_max_tokens must be at least 1, got {generation_max_tokens}")
        has_template = has_chat_template(tokenizer, required="chat_template" if chat_template else None)
        self.tokenizer, self.requests, self.batch_size = tokenizer, list(requests), batch_size
        self.fluency, self.fluency_sampling = fluency, fluency_sampling
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self._jobs = [_jobs(r) for r in self.requests]
        self.generation, self.generation_max_tokens = generation, generation_max_tokens
        self.chat_template = has_template if chat_template is None else chat_template
        self.pre_locality: list[list[list[int]]] | None = None
        """Per request, the pre-edit argmax ids of each locality job, in job order."""
        self.pre_generated: list[list[str]] | None = None
        """With `generation`: per request, the pre-edit generated answer to every scored prompt, in job order."""

    def _locality_pairs(self, index: int) -> list[tuple[str, str]]:
        return [(p, a) for field, _, p, a in self._jobs[index] if field == "locality"]

    def _decoding(self) -> dict:
        return {"chat_template": self.chat_template, "max_new_tokens": self.generation_max_tokens}

    def snapshot_key(self, weights: str) -> str:
        """A sha256 (hex) of what :meth:`snapshot_pre` reads: the model's weights (`weights`, their
        `models.weights_digest`), the token ids of every scored prompt and answer, the decoding (chat template
        included) and the batch size."""
        template = getattr(self.tokenizer, "chat_template", None) if self.chat_template else None
        inputs = [[encode(self.tokenizer, p, a).input_ids for _, _, p, a in jobs] for jobs in self._jobs]
        return hashlib.sha256(json.dumps([inputs, self.generation, self._decoding(), template, self.batch_size,
                                          weights]).encode()).hexdigest()

    def snapshot_pre(self, model: torch.nn.Module) -> None:
        """Records the unedited model's locality predictions for every request and, with
        `generation`, its generated answer to every scored prompt."""
        pairs = [self._locality_pairs(i) for i in range(len(self.requests))]
        with _eval_mode(model):
            flat = teacher_forced_argmax(model, self.tokenizer, [p for ps in pairs for p in ps], self.batch_size)
            answers = iter(self._answers(model, [p for jobs in self._jobs for _, _, p, _ in jobs], "pre-edit answers")
                           if self.generation else ())
        preds = iter(pred.tolist() for pred, _ in flat)
        self.pre_locality = [[next(preds) for _ in ps] for ps in pairs]
        if self.generation:
            self.pre_generated = [[next(answers) for _ in jobs] for jobs in self._jobs]

    def state_dict(self) -> dict:
        """``{"pre_locality": per request, per locality prompt, the pre-edit argmax ids, "pre_generated":
        per request, per scored prompt, the pre-edit generated answer, "decoding": how they were
        decoded}``; plain data."""
        return {"pre_locality": self.pre_locality, "pre_generated": self.pre_generated, "decoding": self._decoding()}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (e.g. after a JSON round trip) for a resumed run."""
        pre = state["pre_locality"]
        if pre is not None and (len(pre) != len(self.requests) or any(
                len(p) != len(self._locality_pairs(i)) for i, p in enumerate(pre))):
            raise ValueError("pre_locality does not match these requests' locality probes")
        generated = state.get("pre_generated")
        if self.generation:
            if generated is None:
                raise ValueError("generation is on, but the saved state has no pre-edit generated answers "
                                 "(saved with generation off, or by an older version): start the run again")
            if state.get("decoding") != self._decoding():
                raise ValueError(f"the pre-edit answers were decoded with {state.get('decoding')}, "
                                 f"this evaluator decodes with {self._decoding()}")
            if len(generated) != len(self.requests) or any(
                    len(g) != len(jobs) for g, jobs in zip(generated, self._jobs)):
                raise ValueError("pre_generated does not match these requests' scored prompts")
        self.pre_locality, self.pre_generated = pre, generated

    def evaluate(self, model: torch.nn.Module, indices: Sequence[int] | None = None, full: bool = True
                 ) -> list[dict]:
        """Per-request rows: ``index, source, edit_success, rephrase, portability {kind: score},
        portability_mean, locality {kind: score}, locality_mean, fluency`` and with `generation` the
        ``gen_*``/``pre_gen_*`` pairs of :meth:`_generation_row`; scores in [0, 1], None where a request
        has nothing to score (fluency: None when disabled). Not `full`: no fluency, and only the edit
        prompts' answers are generated (the other ``gen_*`` are None): a fifth of the decoding on ZsRE."""
        indices = list(range(len(self.requests)) if indices is None else indices)
        if ((self.pre_locality is None and any(self._locality_pairs(i) for i in indices))
                or (self.generation and self.pre_generated is None and indices)):
            raise RuntimeError("call snapshot_pre(model) on the unedited model before evaluate()")
        if not indices:
            return []
        with _eval_mode(model):
            pairs = [(p, a) for i in indices for _, _, p, a in self._jobs[i]]
            preds = teacher_forced_argmax(model, self.tokenizer, pairs, self.batch_size)
            texts = self._generate(model, indices) if self.fluency and full else [None] * len(indices)
            decoded = [p for p, _ in pairs] if full else [self.requests[i].prompt for i in indices]
            answers = iter(self._answers(model, decoded, "answers") if self.generation else ())
        refs = self._references(indices, preds)
        scores = iter(token_accuracy(*_pad_pairs([p for p, _ in preds], refs)).tolist())
        rows = []
        for i, text in zip(indices, texts):
            row = self._row(i, [(job, next(scores)) for job in self._jobs[i]], text)
            if self.generation:
                decoded_here = len(self._jobs[i]) if full else 1
                row.update(self._generation_row(i, [next(answers) for _ in range(decoded_here)]))
            rows.append(row)
        return rows

    def edit_success(self, model: torch.nn.Module, indices: Sequence[int]) -> list[float]:
        """Only the Edit Succ. of these requests: one teacher-forced pass over their edit prompts."""
        pairs = [(self.requests[i].prompt, self.requests[i].target_new) for i in indices]
        with _eval_mode(model):
            preds = teacher_forced_argmax(model, self.tokenizer, pairs, self.batch_size)
        return token_accuracy(*_pad_pairs([p for p, _ in preds], [label for _, label in preds])).tolist()

    def generated_right_after(self, model: torch.nn.Module, indices: Sequence[int]) -> list[dict]:
        """Per request, ``{"gen_edit_success_em", "gen_edit_success_contains"}`` of the model's generated
        answer to its edit prompt now (one batched decode), e.g. right after the request's own edit."""
        with _eval_mode(model):
            answers = self._answers(model, [self.requests[i].prompt for i in indices])
        return [{"gen_edit_success_em": exact_match(answer, self.requests[i].target_new),
                 "gen_edit_success_contains": contains(answer, self.requests[i].target_new)}
                for i, answer in zip(indices, answers)]

    def _answers(self, model: torch.nn.Module, prompts: Sequence[str], progress: str | None = None) -> list[str]:
        return greedy_answers(model, self.tokenizer, prompts, self.generation_max_tokens, self.batch_size,
                              chat_template=self.chat_template, progress=progress)

    def _generation_row(self, index: int, answers: Sequence[str]) -> dict:
        """Generated-answer scores of one request's first ``len(answers)`` prompts, each ``gen_*`` key followed
        by its ``pre_gen_*`` twin scored on the pre-edit answers: see :meth:`_generated_scores`."""
        post = self._generated_scores(index, answers)
        pre = self._generated_scores(index, self.pre_generated[index][:len(answers)])
        return {k: v for key in post for k, v in ((key, post[key]), (f"pre_{key}", pre[key]))}

    def _generated_scores(self, index: int, answers: Sequence[str]) -> dict:
        """``gen_<field>_em`` and ``gen_<field>_contains`` for edit_success, rephrase and portability
        (means over prompts), ``gen_locality`` (share of locality answers equal to the pre-edit ones)
        and ``gen_answer`` (to the edit prompt), of one request's answers in job order."""
        scores: dict[str, list[float]] = {}
        for (field, _, _, target), answer, pre in zip(self._jobs[index], answers, self.pre_generated[index]):
            if field == "locality":
                scores.setdefault("gen_locality", []).append(exact_match(answer, pre))
            else:
                scores.setdefault(f"gen_{field}_em", []).append(exact_match(answer, target))
                scores.setdefault(f"gen_{field}_contains", []).append(contains(answer, target))
        row = {key: _mean(scores.get(key, ())) for key in GENERATION_KEYS}
        return {**row, "gen_answer": answers[0]}

    def _references(self, indices: Sequence[int], preds: Sequence[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """What each job's prediction is compared with: its answer tokens, or for locality the
        pre-edit argmax."""
        labels = iter(label for _, label in preds)
        refs = []
        for i in indices:
            pre = iter(self.pre_locality[i] if self.pre_locality is not None else ())
            for field, *_ in self._jobs[i]:
                label = next(labels)
                refs.append(torch.tensor(next(pre)) if field == "locality" else label)
        return refs

    def _generate(self, model: torch.nn.Module, indices: Sequence[int]) -> list[str]:
        generator = torch.Generator(device=model_device(model)).manual_seed(self.seed)
        return generate_texts(model, self.tokenizer, [self.requests[i].prompt for i in indices],
                              max_new_tokens=self.max_new_tokens, sampling=self.fluency_sampling,
                              generator=generator, batch_size=self.batch_size, progress="fluency")

    def _row(self, index: int, scored: list[tuple[tuple, float]], text: str | None) -> dict:
        by_field: dict[str, dict[str, list[float]]] = {"portability": {}, "locality": {}}
        flat: dict[str, list[float]] = {"edit_success": [], "rephrase": []}
        for (field, kind, *_), score in scored:
            if field in flat:
                flat[field].append(score)
            else:
                by_field[field].setdefault(kind, []).append(score)
        row = {"index": index, "source": self.requests[index].source,
               "edit_success": flat["edit_success"][0], "rephrase": _mean(flat["rephrase"])}
        for field, per_kind in by_field.items():
            mean, row[field] = probe_accuracy([per_kind])
            row[f"{field}_mean"] = mean
        row["fluency"] = None if text is None else ngram_entropy(text)
        return row

    @staticmethod
    def summarize(rows: Sequence[dict]) -> dict[str, float]:
        """Flat means over rows, accuracies x100 and fluency raw. Keys: ``edit_success``,
        ``rephrase``, ``portability``, ``portability/<kind>``, ``locality``, ``locality/<kind>``,
        ``fluency``, and with generation ``gen_*`` and ``pre_gen_*`` (see `_generated_scores`); a key is
        left out when no row has anything to score for it."""
        summary: dict[str, float] = {}
        means = [("edit_success", EditSuccess()), ("rephrase", Generalization()), ("fluency", Fluency())]
        means += [(key, EditSuccess()) for key in (*GENERATION_KEYS, *PRE_GENERATION_KEYS)
                  if any(key in r for r in rows)]
        for key, metric in means:
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                metric.update(torch.tensor(values, dtype=torch.float64))
                summary[key] = float(metric.compute()) * (1 if key == "fluency" else 100)
        for key, cls in (("portability", Portability), ("locality", Locality)):
            kinds = list(dict.fromkeys(k for r in rows for k in r[key]))
            if kinds:
                metric = cls(kinds)
                metric.update([r[key] for r in rows])
                result = {name: float(v) * 100 for name, v in metric.compute().items()}
                summary[key] = result.pop("mean")
                summary.update({f"{key}/{kind}": v for kind, v in result.items()})
        return summary


def _pad_pairs(preds: Sequence[Tensor], labels: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Variable-length ``(L_i,)`` pairs -> ``preds (N, L)``, ``labels (N, L)``, ``mask (N, L)``."""
    lengths = torch.tensor([len(p) for p in preds])
    if any(len(p) != len(lab) for p, lab in zip(preds, labels)):
        raise ValueError("pre-edit locality predictions do not match the current answer tokens")
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    return pad_sequence(list(preds), batch_first=True), pad_sequence(list(labels), batch_first=True), mask


_TABLE_ROWS = (("edit_success", "Edit Succ."), ("rephrase", "Rephrase"), ("portability", "Portability"),
               ("locality", "Locality"), ("fluency", "Fluency"))


def format_table(summary: dict[str, float]) -> str:
    """An aligned two-column text table of a :meth:`EditEvaluator.summarize` dict; keys it does
    not know (e.g. ``edits_succeeded``) follow under their own names."""
    lines, shown = [], set()
    for key, label in _TABLE_ROWS:
        if key in summary:
            lines.append((label, summary[key]))
        kinds = [k for k in summary if k.startswith(f"{key}/")]
        lines += [(f"  {k.split('/', 1)[1]}", summary[k]) for k in kinds]
        shown.update([key, *kinds])
    lines += [(k, v) for k, v in summary.items() if k not in shown]
    width = max((len(label) for label, _ in lines), default=0)
    return "\n".join(f"{label:<{width}}  {value:8.2f}" for label, value in lines)


def write_results(path: str | os.PathLike, *, config: dict, model: str, dataset: str, method: str,
                  rows: Sequence[dict], edit_records: Sequence[dict], summary: dict, **extra) -> Path:
    """Writes one results JSON atomically (temp file + ``os.replace``) and returns its path.

    Layout: ``{config, model, dataset, method, n_edits, summary, requests, **extra}``; ``requests[i]``
    is ``rows[i]`` merged with ``edit_records[i]`` (cycles, steps, losses, seconds, ...); `extra`
    holds e.g. the retention ``curve`` and ``capability_before``.
    """
    if len(rows) != len(edit_records):
        raise ValueError(f"{len(rows)} rows but {len(edit_records)} edit records")
    for row, record in zip(rows, edit_records):
        if record.get("index", row["index"]) != row["index"]:
            raise ValueError(f"edit record index {record['index']} is not row index {row['index']}")
    results = {"config": config, "model": model, "dataset": dataset, "method": method,
               "n_edits": len(edit_records), "summary": summary,
               "requests": [{**record, **row} for row, record in zip(rows, edit_records)], **extra}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str))
    return Path(path)
