"""Batched evaluation of edited models, EasyEdit's way, and the results file.

Sequences are padded on the LEFT, as EasyEdit does, with an attention mask and ``position_ids``
counted from the mask, so a padded row gets the logits of the same row run alone. Scoring tokens
come from :func:`kdpo_lightning.data.encode`, the rule the training loss uses.
"""
from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from kdpo_lightning.data import EditRequest, encode
from kdpo_lightning.saving import atomic_write
from kdpo_lightning.metrics import (
    EditSuccess, Fluency, Generalization, Locality, Portability, ngram_entropy, probe_accuracy,
    token_accuracy,
)

SAMPLINGS = ("greedy", "top_k")


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int,
              device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pads token rows.

    Returns:
        ``input_ids (B, T)``, ``attention_mask (B, T)`` and ``position_ids (B, T)`` that count
        from 0 at each row's first real token (pads get 0).
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped by similar length, to waste little compute on padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


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
    pad_id, device = _pad_id(tokenizer), _device(model)
    for batch in _batches([len(e.input_ids) for e in encoded], batch_size):
        rows = [encoded[i].input_ids for i in batch]
        ids, mask, positions = _left_pad(rows, pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        preds = logits.argmax(-1).cpu()  # (B, T)
        ids, width = ids.cpu(), ids.shape[1]
        for row, i in enumerate(batch):
            start = width - len(rows[row]) + encoded[i].target_start
            out[i] = (preds[row, start - 1:width - 1], ids[row, start:])
    return out


def _next_token(logits: Tensor, sampling: str, generator: torch.Generator | None, top_k: int = 5) -> Tensor:
    """``(B, V)`` last-position logits -> ``(B,)`` next tokens: argmax, or EasyEdit's top-k
    sampling (softmax at temperature 1, keep the top k, renormalize, multinomial)."""
    if sampling == "greedy":
        return logits.argmax(-1)
    probs, ids = logits.float().softmax(-1).topk(top_k, dim=-1)
    choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)
    return ids.gather(-1, choice).squeeze(-1)


def _kv_cache(out) -> dict:
    """The KV cache of a forward's output, as the keyword the next forward takes: transformers 5
    calls it ``cache`` (``past_key_values`` is deprecated there), older releases ``past_key_values``."""
    name = "cache" if "cache" in out else "past_key_values"
    return {name: out[name]}


@torch.no_grad()
def generate_texts(model: torch.nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100,
                   sampling: str = "greedy", generator: torch.Generator | None = None,
                   batch_size: int = 16) -> list[str]:
    """Continues each prompt by ``max_new_tokens`` tokens, batched with left padding and a KV cache.

    EasyEdit's ``generate_fast`` samples top-5 until the *total* length (prompt + new) is 100; here
    the default is greedy and the count is of *new* tokens, so every prompt gets the same amount of
    text to score whatever its length (``sampling="top_k"`` gives EasyEdit's sampler). As there,
    generation does not stop at EOS. Returns prompt + continuation decoded with
    ``skip_special_tokens``, NFKD-normalized, with ``"\\n\\n"`` replaced by a space.
    """
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    texts: list[str] = [""] * len(prompts)
    pad_id, device = _pad_id(tokenizer), _device(model)
    for batch in _batches([len(e) for e in encoded], batch_size):
        rows = [encoded[i] for i in batch]
        ids, mask, positions = _left_pad(rows, pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        new = []
        for step in range(max_new_tokens):
            new.append(_next_token(out.logits[:, -1], sampling, generator))
            if step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=-1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=new[-1][:, None], attention_mask=mask, position_ids=positions,
                        use_cache=True, **_kv_cache(out))
        continuations = torch.stack(new, dim=-1).tolist() if new else [[] for _ in batch]
        for row, i in enumerate(batch):
            text = tokenizer.decode(list(rows[row]) + continuations[row], skip_special_tokens=True)
            texts[i] = unicodedata.normalize("NFKD", text).replace("\n\n", " ").replace("<|endoftext|>", "")
    return texts


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


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


class EditEvaluator:
    """Scores edit requests on a model; keeps the pre-edit locality predictions.

    Call :meth:`snapshot_pre` once on the unedited model, then :meth:`evaluate` after editing and
    :meth:`summarize` on its rows.
    """

    def __init__(self, tokenizer, requests: Sequence[EditRequest], batch_size: int = 16, fluency: bool = True,
                 fluency_sampling: str = "greedy", max_new_tokens: int = 100, seed: int = 0) -> None:
        if fluency_sampling not in SAMPLINGS:
            raise ValueError(f"fluency_sampling must be one of {SAMPLINGS}, got {fluency_sampling!r}")
        self.tokenizer, self.requests, self.batch_size = tokenizer, list(requests), batch_size
        self.fluency, self.fluency_sampling = fluency, fluency_sampling
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self._jobs = [_jobs(r) for r in self.requests]
        self.pre_locality: list[list[list[int]]] | None = None
        """Per request, the pre-edit argmax ids of each locality job, in job order."""

    def _locality_pairs(self, index: int) -> list[tuple[str, str]]:
        return [(p, a) for field, _, p, a in self._jobs[index] if field == "locality"]

    def snapshot_pre(self, model: torch.nn.Module) -> None:
        """Records the unedited model's locality predictions for every request."""
        pairs = [self._locality_pairs(i) for i in range(len(self.requests))]
        flat = teacher_forced_argmax(model, self.tokenizer, [p for ps in pairs for p in ps], self.batch_size)
        preds = iter(pred.tolist() for pred, _ in flat)
        self.pre_locality = [[next(preds) for _ in ps] for ps in pairs]

    def state_dict(self) -> dict:
        """``{"pre_locality": per request, per locality prompt, the pre-edit argmax ids}``; plain lists."""
        return {"pre_locality": self.pre_locality}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict` (e.g. after a JSON round trip) for a resumed run."""
        pre = state["pre_locality"]
        if pre is not None and (len(pre) != len(self.requests) or any(
                len(p) != len(self._locality_pairs(i)) for i, p in enumerate(pre))):
            raise ValueError("pre_locality does not match these requests' locality probes")
        self.pre_locality = pre

    def evaluate(self, model: torch.nn.Module, indices: Sequence[int] | None = None) -> list[dict]:
        """Per-request rows: ``index, source, edit_success, rephrase, portability {kind: score},
        portability_mean, locality {kind: score}, locality_mean, fluency``; scores in [0, 1],
        None where a request has nothing to score (fluency: None when disabled)."""
        indices = list(range(len(self.requests)) if indices is None else indices)
        if self.pre_locality is None and any(self._locality_pairs(i) for i in indices):
            raise RuntimeError("call snapshot_pre(model) on the unedited model before evaluate()")
        if not indices:
            return []
        was_training = model.training
        model.eval()
        try:
            pairs = [(p, a) for i in indices for _, _, p, a in self._jobs[i]]
            preds = teacher_forced_argmax(model, self.tokenizer, pairs, self.batch_size)
            texts = self._generate(model, indices) if self.fluency else [None] * len(indices)
        finally:
            model.train(was_training)
        refs = self._references(indices, preds)
        scores = iter(token_accuracy(*_pad_pairs([p for p, _ in preds], refs)).tolist())
        return [self._row(i, [(job, next(scores)) for job in self._jobs[i]], text)
                for i, text in zip(indices, texts)]

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
        generator = torch.Generator(device=_device(model)).manual_seed(self.seed)
        return generate_texts(model, self.tokenizer, [self.requests[i].prompt for i in indices],
                              max_new_tokens=self.max_new_tokens, sampling=self.fluency_sampling,
                              generator=generator, batch_size=self.batch_size)

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
        ``fluency``; a key is left out when no row has anything to score for it."""
        summary: dict[str, float] = {}
        means = (("edit_success", EditSuccess()), ("rephrase", Generalization()), ("fluency", Fluency()))
        for key, metric in means:
            values = [r[key] for r in rows if r[key] is not None]
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
                  rows: Sequence[dict], edit_records: Sequence[dict], summary: dict) -> Path:
    """Writes one results JSON atomically (temp file + ``os.replace``) and returns its path.

    Layout: ``{config, model, dataset, method, n_edits, summary, requests}``; ``requests[i]`` is
    ``rows[i]`` merged with ``edit_records[i]`` (cycles, steps, losses, seconds, ...).
    """
    if len(rows) != len(edit_records):
        raise ValueError(f"{len(rows)} rows but {len(edit_records)} edit records")
    for row, record in zip(rows, edit_records):
        if record.get("index", row["index"]) != row["index"]:
            raise ValueError(f"edit record index {record['index']} is not row index {row['index']}")
    results = {"config": config, "model": model, "dataset": dataset, "method": method,
               "n_edits": len(edit_records), "summary": summary,
               "requests": [{**record, **row} for row, record in zip(rows, edit_records)]}
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2, default=str))
    return Path(path)
