"""Edit metrics as EasyEdit computes them (see ``shared/EVAL_SPEC.md``), torchmetrics style.

Each metric has pure functional pieces (``_*_update`` returning summable states, ``_*_compute``
turning them into the score) and a :class:`torchmetrics.Metric` whose states are tensors reduced
by ``sum``, so ``update(a); update(b); compute()`` equals ``update(a + b); compute()`` and
distributed sync is a plain all-reduce. Scores are fractions in [0, 1]; fluency is raw entropy.

- :class:`EditSuccess` / :class:`Generalization`: teacher-forced token accuracy of ``target_new``
  after the rewrite / rephrase prompt, mean over target tokens, then over requests.
- :class:`Portability` / :class:`Locality`: per request, the mean over each kind's prompts, then
  over the request's kinds; summary = mean over requests that have any kind. Each kind's own mean
  over the requests that have it is reported too (the KDPO fork's per-kind numbers).
- :class:`Fluency`: weighted bi/tri-gram entropy of generated text.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import torch
from nltk.tokenize import NLTKWordTokenizer
from torch import Tensor
from torchmetrics import Metric

ProbeScores = Mapping[str, "float | Sequence[float]"]
"""One request's probe scores: kind -> one score per prompt (or their mean)."""

_WORD_TOKENIZER = NLTKWordTokenizer()


def token_accuracy(preds: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-row share of target tokens predicted right: EasyEdit's ``mean(pred == label)``.

    Args:
        preds: ``(B, T)`` predicted token ids (argmax at the position before each target token).
        labels: ``(B, T)`` target token ids (or, for locality, the pre-edit predictions).
        mask: ``(B, T)`` bool, True on real target tokens; None means all real.

    Returns:
        ``(B,)`` float64 scores; NaN for a row with no target token.
    """
    if preds.shape != labels.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
    mask = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask.bool()
    hits = ((preds == labels) & mask).sum(-1).double()
    return hits / mask.sum(-1).double()


def _mean_update(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``(B,)`` scores -> (sum, count) over the non-NaN ones (EasyEdit drops NaN scores)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    keep = ~scores.isnan()
    return scores[keep].sum(), keep.sum()


def _mean_compute(total: Tensor, count: Tensor) -> Tensor:
    """Mean from summed states; NaN when nothing was counted."""
    return total / count if count > 0 else torch.full_like(total, math.nan)


def _edit_success_update(preds: Tensor, labels: Tensor | None = None,
                         mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(sum, count) of per-request token accuracies; ``preds`` alone are ``(B,)`` ready scores."""
    return _mean_update(preds if labels is None else token_accuracy(preds, labels, mask))


def edit_success(preds: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """Mean over requests of the per-request token accuracy (shapes as :func:`token_accuracy`)."""
    return _mean_compute(*_edit_success_update(preds, labels, mask))


class _SumMeanMetric(Metric):
    """Mean of per-request scores kept as (sum, count) tensor states."""

    full_state_update = False
    higher_is_better = True
    total: Tensor
    count: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, total: Tensor, count: Tensor) -> None:
        self.total += total.to(self.total)
        self.count += count.to(self.count)

    def compute(self) -> Tensor:
        return _mean_compute(self.total, self.count)


class EditSuccess(_SumMeanMetric):
    """Teacher-forced token accuracy of ``target_new`` after the prompt, mean over requests.

    ``update(preds, labels, mask)`` takes ``(B, T)`` token tensors; ``update(scores)`` takes
    ``(B,)`` per-request scores already computed with :func:`token_accuracy`.
    """

    def update(self, preds: Tensor, labels: Tensor | None = None, mask: Tensor | None = None) -> None:
        self._add(*_edit_success_update(preds, labels, mask))


class Generalization(EditSuccess):
    """:class:`EditSuccess` on rephrased prompts (EasyEdit's ``rephrase_acc``)."""


def _kind_matrix(batch: Sequence[ProbeScores], kinds: Sequence[str]) -> Tensor:
    """Per-request, per-kind mean over that kind's prompts.

    Returns:
        ``(B, K)`` float64, NaN where a request has no (non-NaN) score of that kind.
    """
    out = torch.full((len(batch), len(kinds)), math.nan, dtype=torch.float64)
    column = {kind: k for k, kind in enumerate(kinds)}
    for b, scores in enumerate(batch):
        for kind, values in scores.items():
            if kind not in column:
                raise ValueError(f"unknown probe kind {kind!r}; this metric tracks {list(kinds)}")
            values = torch.as_tensor(values, dtype=torch.float64).flatten()
            values = values[~values.isnan()]
            if len(values):
                out[b, column[kind]] = values.mean()
    return out


def _probe_update(scores: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EasyEdit's per-request averaging over kinds.

    Args:
        scores: ``(B, K)`` per-kind scores, NaN where a request lacks a kind.

    Returns:
        ``kind_total (K,)``, ``kind_count (K,)``: per-kind sums and request counts;
        ``total``, ``count``: sum of per-request means over kinds, number of requests with any kind.
    """
    present = ~scores.isnan()
    filled = scores.nan_to_num(0.0)
    n_kinds = present.sum(-1)
    has_any = n_kinds > 0
    request_mean = filled.sum(-1) / n_kinds.clamp(min=1)
    return filled.sum(0), present.sum(0), request_mean[has_any].sum(), has_any.sum()


def _probe_compute(kind_total: Tensor, kind_count: Tensor, total: Tensor,
                   count: Tensor) -> tuple[Tensor, Tensor]:
    """Returns the mean over requests with any kind, and ``(K,)`` per-kind means (NaN if unseen)."""
    return _mean_compute(total, count), kind_total / kind_count


def probe_accuracy(batch: Sequence[ProbeScores],
                   kinds: Sequence[str] | None = None) -> tuple[float | None, dict[str, float]]:
    """Functional portability/locality over requests: ``(mean or None, {kind: mean})``.

    ``kinds`` defaults to every kind in ``batch`` in first-seen order; a kind no request has is
    left out of the dict. With one request this is that request's row score.
    """
    kinds = list(dict.fromkeys(k for scores in batch for k in scores)) if kinds is None else kinds
    kind_total, kind_count, total, count = _probe_update(_kind_matrix(batch, kinds))
    mean, per_kind = _probe_compute(kind_total, kind_count, total, count)
    seen = {kind: float(v) for kind, v, n in zip(kinds, per_kind, kind_count) if n > 0}
    return (float(mean) if count > 0 else None), seen


class _ProbeMetric(Metric):
    """Probe accuracy per kind and averaged per request; ``compute()`` -> ``{"mean", *kinds}``."""

    full_state_update = False
    higher_is_better = True
    kind_total: Tensor
    kind_count: Tensor
    total: Tensor
    count: Tensor

    def __init__(self, kinds: Sequence[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.kinds = list(kinds)
        if "mean" in self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct and not 'mean', got {self.kinds}")
        k = len(self.kinds)
        self.add_state("kind_total", torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("kind_count", torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, scores: Tensor | Sequence[ProbeScores]) -> None:
        """Args:
            scores: ``(B, K)`` per-kind scores in ``kinds`` order (NaN = absent), or one mapping
                per request ``{kind: score or per-prompt scores}``.
        """
        if not isinstance(scores, Tensor):
            scores = _kind_matrix(scores, self.kinds)
        elif scores.ndim != 2 or scores.shape[1] != len(self.kinds):
            raise ValueError(f"scores must be (B, {len(self.kinds)}), got {tuple(scores.shape)}")
        states = ("kind_total", "kind_count", "total", "count")
        for state, value in zip(states, _probe_update(scores.double())):
            setattr(self, state, getattr(self, state) + value.to(getattr(self, state)))

    def compute(self) -> dict[str, Tensor]:
        mean, per_kind = _probe_compute(self.kind_total, self.kind_count, self.total, self.count)
        return {"mean": mean, **dict(zip(self.kinds, per_kind))}


class Portability(_ProbeMetric):
    """Token accuracy of portability answers (Reasoning, Subject_Aliasing, one_hop, ...)."""


class Locality(_ProbeMetric):
    """Share of locality answer tokens whose post-edit argmax equals the pre-edit argmax.

    Per prompt: :func:`token_accuracy` with the pre-edit argmax as labels.
    """


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """EasyEdit's ``compute_n_gram_entropy``: ``mean_n(w_n * H_n)``, ``H_n = -sum p log2 p`` over
    the n-gram frequencies of the word tokens; with the defaults ``H2 / 3 + 2 * H3 / 3``.

    EasyEdit tokenizes with ``nltk.word_tokenize``, which needs the punkt sentence model; that is
    not available offline, so this applies ``NLTKWordTokenizer().tokenize`` (the word tokenizer
    ``word_tokenize`` runs per sentence) to the whole text. The one difference: a period that ends
    a sentence inside the text stays attached to its word ("Paris." vs "Paris", ".").
    """
    words = _WORD_TOKENIZER.tokenize(text)
    weighted = []
    for n, weight in zip(ns, weights):
        counts = Counter(zip(*(words[i:] for i in range(n))))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values())
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def _fluency_update(texts: Sequence[str] | Tensor) -> tuple[Tensor, Tensor]:
    """(sum, count) of n-gram entropies of ``texts``, or of ``(B,)`` ready scores."""
    if isinstance(texts, Tensor):
        return _mean_update(texts)
    return _mean_update(torch.tensor([ngram_entropy(t) for t in texts], dtype=torch.float64))


def fluency(texts: Sequence[str] | Tensor) -> Tensor:
    """Mean :func:`ngram_entropy` over texts (EasyEdit's ``n_gram_entropy``, raw scale)."""
    return _mean_compute(*_fluency_update(texts))


class Fluency(_SumMeanMetric):
    """Mean weighted n-gram entropy of generated texts; ``update(texts)`` or ``update(scores)``."""

    def update(self, texts: Sequence[str] | Tensor) -> None:
        self._add(*_fluency_update(texts))
