"""General capability before and after editing: log-likelihood multiple choice, scored as
lm-evaluation-harness scores MMLU, HellaSwag, PIQA and WinoGrande (zero-shot).

Each question is a set of (context, continuation) pairs, one per choice; the model picks the
continuation with the highest summed log-likelihood (`acc`), or the highest per character of the
choice (`acc_norm`, reported for HellaSwag and PIQA, as the harness does).
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .data import DataError
from .generation import by_length, left_pad, model_device, pad_token_id
from .sources import find_data

ACC_NORM = ("hellaswag", "piqa")


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: per choice a context and a continuation; `label` is the answer."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int


def _mmlu(r: dict) -> Question:
    letters = "ABCD"
    options = "".join(f"{letters[i]}. {c.strip()}\n" for i, c in enumerate(r["choices"]))
    prompt = (f"The following are multiple choice questions (with answers) about {r['subject'].replace('_', ' ')}."
              f"\n\n{r['question'].strip()}\n{options}Answer:")
    return Question((prompt,) * 4, tuple(f" {x}" for x in letters), int(r["answer"]))


def _hellaswag_text(text: str) -> str:
    """The harness's HellaSwag preprocessing: WikiHow markers out, double spaces folded."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(r: dict) -> Question:
    context = _hellaswag_text(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}")
    return Question((context,) * len(r["endings"]), tuple(f" {_hellaswag_text(e)}" for e in r["endings"]),
                    int(r["label"]))


def _piqa(r: dict) -> Question:
    return Question((f"Question: {r['goal']}\nAnswer:",) * 2, (f" {r['sol1']}", f" {r['sol2']}"), int(r["label"]))


def _winogrande(r: dict) -> Question:
    """Partial evaluation: the option fills the blank in the context; the rest of the sentence is scored."""
    cut = r["sentence"].index("_")
    rest = f" {r['sentence'][cut + 1:].strip()}"
    return Question(tuple(r["sentence"][:cut] + r[k] for k in ("option1", "option2")), (rest, rest),
                    int(r["answer"]) - 1)


BENCHMARKS = {"mmlu": _mmlu, "hellaswag": _hellaswag, "piqa": _piqa, "winogrande": _winogrande}


def load_questions(name: str, n: int | None = None, seed: int = 0) -> list[Question]:
    """A seeded random subset of `n` questions (all if None), in file order, found as data set
    `general/<name>` on the data search path."""
    if name not in BENCHMARKS:
        raise ValueError(f"capability benchmark must be one of {sorted(BENCHMARKS)}, got {name!r}")
    path = find_data(f"general/{name}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").split("\n"), 1):  # not splitlines():
        try:  # JSON strings may hold U+2028 and other characters it would split at
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON: {err.msg}") from None
    picks = range(len(records)) if n is None or n >= len(records) else sorted(
        random.Random(seed).sample(range(len(records)), n))
    return [BENCHMARKS[name](records[i]) for i in picks]


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, tokenizer, pairs: Sequence[tuple[str, str]],
                   batch_size: int = 16, progress: str | None = None) -> list[float]:
    """Summed log p(continuation | context) per pair. The continuation's tokens are those of
    context + continuation after the context's own tokens, as in the harness. Each distinct input
    (the tokens but the last) runs once: MMLU's four one-token answers share one forward, and only
    the rows predicting continuation tokens go through the LM head."""
    rows, lengths = [], []
    for context, continuation in pairs:
        rows.append(tokenizer(context + continuation)["input_ids"])
        lengths.append(len(rows[-1]) - len(tokenizer(context)["input_ids"]))
    need: dict[tuple[int, ...], int] = {}  # distinct input -> most continuation tokens scored on it
    for row, n in zip(rows, lengths):
        need[tuple(row[:-1])] = max(need.get(tuple(row[:-1]), 0), n)
    inputs, logps = list(need), {}
    pad, device = pad_token_id(tokenizer), model_device(model)
    for batch in by_length([len(x) for x in inputs], batch_size, progress):
        ids, mask, positions = left_pad([inputs[j] for j in batch], pad, device)
        keep = max(need[inputs[j]] for j in batch)  # rows end together: the last `keep` positions
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                    logits_to_keep=keep).logits.float().log_softmax(-1)  # (B, keep, V)
        for r, j in enumerate(batch):
            logps[inputs[j]] = out[r]
    scores = []
    for row, n in zip(rows, lengths):
        rows_for_row = logps[tuple(row[:-1])][-n:]  # the n positions predicting the continuation
        scores.append(float(rows_for_row.gather(-1, torch.tensor(row[-n:], device=device)[:, None]).sum()))
    return scores


def score(model: torch.nn.Module, tokenizer, name: str, questions: Sequence[Question],
          batch_size: int = 16) -> dict[str, float]:
    """{"acc"} (and {"acc_norm"} for HellaSwag and PIQA) x100 over `questions`."""
    pairs = [(c, k) for q in questions for c, k in zip(q.contexts, q.continuations)]
    lls = iter(loglikelihoods(model, tokenizer, pairs, batch_size, progress=name))
    acc = norm = 0
    for q in questions:
        scores = [next(lls) for _ in q.continuations]
        acc += max(range(len(scores)), key=scores.__getitem__) == q.label
        per_char = [s / len(k.lstrip(" ")) for s, k in zip(scores, q.continuations)]
        norm += max(range(len(per_char)), key=per_char.__getitem__) == q.label
    result = {"acc": 100.0 * acc / len(questions)}
    if name in ACC_NORM:
        result["acc_norm"] = 100.0 * norm / len(questions)
    return result
