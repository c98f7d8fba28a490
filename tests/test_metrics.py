"""Metrics: functional == class == a plain-Python loop written out here, EasyEdit's averaging."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from kdpo_lightning.data import EditRequest
from kdpo_lightning.evaluate import EditEvaluator
from kdpo_lightning.metrics import (
    EditSuccess, Fluency, Generalization, Locality, Portability, edit_success, fluency, ngram_entropy,
    probe_accuracy, token_accuracy,
)

REQUESTS = [
    EditRequest(
        prompt="What university did Watts Humphrey attend?", target_new="University of Michigan",
        subject="Watts Humphrey", rephrase=("What university did Watts Humphrey go to?",),
        portability={
            "Reasoning": (("Which state is the university Watts Humphrey attended in?", ("Michigan", "MI")),
                          ("Which city hosts the university Watts Humphrey attended?", ("Ann Arbor",))),
            "Subject_Aliasing": (
                ("What university did Watts S. Humphrey attend?", ("University of Michigan",)),
            ),
        },
        locality={
            "Relation_Specificity": (("What is the birth year of Watts Humphrey?", ("1927",)),),
            "Forgetfulness": (("Which country is the University of Michigan in?", ("United States",)),),
        },
        source="t#0",
    ),
    EditRequest(
        prompt="Which family does Ramalinaceae belong to?", target_new="Lecanorales", subject="Ramalinaceae",
        portability={"Logical_Generalization": (("Is Ramalinaceae a fungus?", ("",)),)},
        locality={"Relation_Specificity": (("Who is the father of Alice Aycock?", ("John Aycock",)),
                                           ("In which language is The Fox written?", ("English",)))},
        source="t#1",
    ),
    EditRequest(
        prompt="The mother of Mary Ann Cotton is whom?", target_new="Margaret Robson",
        subject="Mary Ann Cotton",
        rephrase=("Who is Mary Ann Cotton's mother?", "Mary Ann Cotton was born to which mother?"),
        portability={"Reasoning": (
            ("The mother of Mary Ann Cotton was born in which country?", ("England",)),
        )},
        source="t#2",
    ),
    EditRequest(
        prompt="Which river does Quebrada del Toro flow into?", target_new="Rio Grande",
        subject="Quebrada del Toro",
        portability={"Subject_Aliasing": (("Which river does the Toro creek flow into?", ("Rio Grande",)),)},
        locality={"Forgetfulness": (("Which river flows through Paris?", ("Seine",)),)},
        source="t#3",
    ),
]


def plain_argmax(model, tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """One unpadded sequence, one token at a time: argmax before each answer token, and the token."""
    ids = tokenizer(prompt + " " + answer)["input_ids"]
    start = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    preds, labels = [], []
    for t in range(start, len(ids)):
        preds.append(int(logits[t - 1].argmax()))
        labels.append(ids[t])
    return preds, labels


def plain_share(preds: list[int], labels: list[int]) -> float:
    hits = 0
    for p, label in zip(preds, labels):
        hits += p == label
    return hits / len(labels)


def plain_mean(values):
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def models(bpe_tokenizer):
    """(unedited, edited) tiny LLaMAs; the edited one had its last MLP down-projection trained a
    few steps on three targets, so accuracies and locality are neither all 0 nor all 1."""
    pre, post = tiny_model("llama"), tiny_model("llama")
    texts = [r.prompt + " " + r.target_new for r in (REQUESTS[0], REQUESTS[2], REQUESTS[3])]
    batch = bpe_tokenizer(texts, padding=True, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.Adam([post.model.layers[-1].mlp.down_proj.weight], lr=1e-2)
    for _ in range(8):
        post(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return pre, post


def easyedit_rows(pre, post, tokenizer) -> list[dict]:
    """EasyEdit's per-case numbers, computed with plain loops."""
    rows = []
    for r in REQUESTS:
        row = {"edit_success": plain_share(*plain_argmax(post, tokenizer, r.prompt, r.target_new))}
        rephrase = [plain_share(*plain_argmax(post, tokenizer, p, r.target_new)) for p in r.rephrase]
        row["rephrase"] = plain_mean(rephrase) if rephrase else None
        row["portability"] = {}
        for kind, probes in r.portability.items():
            accs = [plain_share(*plain_argmax(post, tokenizer, p, a[0])) for p, a in probes if a[0].strip()]
            if accs:
                row["portability"][kind] = plain_mean(accs)
        row["locality"] = {}
        for kind, probes in r.locality.items():
            accs = [plain_share(plain_argmax(post, tokenizer, p, a[0])[0],
                                plain_argmax(pre, tokenizer, p, a[0])[0]) for p, a in probes]
            row["locality"][kind] = plain_mean(accs)
        rows.append(row)
    return rows


def test_token_accuracy_matches_loop():
    torch.manual_seed(0)
    preds, labels = torch.randint(0, 3, (5, 7)), torch.randint(0, 3, (5, 7))
    lengths = [7, 3, 1, 5, 0]
    mask = torch.tensor([[t < n for t in range(7)] for n in lengths])
    got = token_accuracy(preds, labels, mask)
    for b, n in enumerate(lengths[:-1]):
        assert got[b].item() == pytest.approx(plain_share(preds[b, :n].tolist(), labels[b, :n].tolist()))
    assert math.isnan(got[-1])


def test_edit_success_class_equals_functional_over_batches():
    torch.manual_seed(1)
    preds, labels = torch.randint(0, 2, (10, 4)), torch.randint(0, 2, (10, 4))
    mask = torch.rand(10, 4) > 0.3
    mask[:, 0] = True
    whole = edit_success(preds, labels, mask)
    metric = EditSuccess()
    for chunk in ([0, 1, 2], [3], [4, 5, 6, 7, 8, 9]):
        metric.update(preds[chunk], labels[chunk], mask[chunk])
    assert metric.compute().item() == pytest.approx(whole.item())
    scores = Generalization()
    scores.update(token_accuracy(preds, labels, mask))
    assert scores.compute().item() == pytest.approx(whole.item())
    per_row = [plain_share(p[m].tolist(), lab[m].tolist()) for p, lab, m in zip(preds, labels, mask)]
    assert whole.item() == pytest.approx(plain_mean(per_row))


def test_probe_metric_averages_per_request_then_over_requests():
    batch = [{"Reasoning": [1.0, 0.0], "Subject_Aliasing": [1.0]},  # kinds 0.5 and 1.0 -> 0.75
             {"Reasoning": 0.25},                                       # 0.25
             {},                                                         # skipped
             {"Subject_Aliasing": [0.5, float("nan")]}]                 # NaN dropped -> 0.5
    mean, per_kind = probe_accuracy(batch)
    assert mean == pytest.approx((0.75 + 0.25 + 0.5) / 3)
    assert per_kind == pytest.approx({"Reasoning": (0.5 + 0.25) / 2, "Subject_Aliasing": (1.0 + 0.5) / 2})
    metric = Portability(["Reasoning", "Subject_Aliasing", "Logical_Generalization"])
    metric.update(batch[:1])
    metric.update(batch[1:3])
    metric.update(batch[3:])
    result = metric.compute()
    assert result["mean"].item() == pytest.approx(mean)
    assert result["Reasoning"].item() == pytest.approx(per_kind["Reasoning"])
    assert math.isnan(result["Logical_Generalization"])
    as_tensor = Portability(["Reasoning", "Subject_Aliasing", "Logical_Generalization"])
    nan = float("nan")
    as_tensor.update(torch.tensor([[0.5, 1.0, nan], [0.25, nan, nan], [nan, nan, nan], [nan, 0.5, nan]]))
    assert as_tensor.compute()["mean"].item() == pytest.approx(mean)


def test_probe_metric_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="one_hop"):
        Locality(["neighborhood"]).update([{"one_hop": [1.0]}])
    with pytest.raises(ValueError, match="mean"):
        Locality(["mean"])


def test_ngram_entropy_by_hand():
    # Words: a b a b a.
    # Bigrams (ab, ba, ab, ba): p = 1/2, 1/2 -> H2 = 1.
    # Trigrams (aba, bab, aba): p = 2/3, 1/3 -> H3 = -(2/3 log2 2/3 + 1/3 log2 1/3) = log2 3 - 2/3 = 0.918296.
    # Score = mean(2/3 * H2, 4/3 * H3) = 1/3 + 2/3 * 0.918296 = 0.945531.
    assert ngram_entropy("a b a b a") == pytest.approx(1 / 3 + 2 / 3 * (math.log2(3) - 2 / 3))
    assert ngram_entropy("a b a b a") == pytest.approx(0.945531, abs=1e-6)
    # Punctuation is its own word: "x y ." -> bigrams (x y), (y .): H2 = 1; one trigram: H3 = 0 -> 1/3.
    assert ngram_entropy("x y.") == pytest.approx(1 / 3)
    assert ngram_entropy("one") == 0.0


def test_fluency_class_equals_functional_over_batches():
    texts = ["a b a b a", "the cat sat on the mat", "x y.", "one two one two three"]
    metric = Fluency()
    metric.update(texts[:1])
    metric.update(texts[1:])
    assert metric.compute().item() == pytest.approx(fluency(texts).item())
    assert fluency(texts).item() == pytest.approx(plain_mean([ngram_entropy(t) for t in texts]))
    scores = Fluency()
    scores.update(torch.tensor([ngram_entropy(t) for t in texts]))
    assert scores.compute().item() == pytest.approx(fluency(texts).item())


def test_evaluator_matches_plain_easyedit(models, bpe_tokenizer):
    pre, post = models
    evaluator = EditEvaluator(bpe_tokenizer, REQUESTS, batch_size=3, fluency=False)
    evaluator.snapshot_pre(pre)
    rows = evaluator.evaluate(post)
    expected = easyedit_rows(pre, post, bpe_tokenizer)
    for row, want in zip(rows, expected):
        assert row["edit_success"] == pytest.approx(want["edit_success"])
        assert row["rephrase"] == pytest.approx(want["rephrase"])
        assert row["portability"] == pytest.approx(want["portability"])
        assert row["locality"] == pytest.approx(want["locality"])
        for key in ("portability", "locality"):
            values = list(want[key].values())
            assert row[f"{key}_mean"] == (pytest.approx(plain_mean(values)) if values else None)
    assert rows[1]["portability"] == {}  # its only probe has a blank answer
    assert rows[1]["rephrase"] is None and rows[2]["locality_mean"] is None
    assert 0 < sum(r["edit_success"] for r in rows) < len(rows)  # the test is not trivially 0 or 1
    assert any(0 < v < 1 for r in rows for v in r["locality"].values())

    summary = evaluator.summarize(rows)
    assert summary["edit_success"] == pytest.approx(100 * plain_mean([w["edit_success"] for w in expected]))
    rephrase = [w["rephrase"] for w in expected if w["rephrase"] is not None]
    assert summary["rephrase"] == pytest.approx(100 * plain_mean(rephrase))
    for key in ("portability", "locality"):
        # run_knowedit's eval(): per case, mean over its keys; cases without keys are skipped.
        cases = [plain_mean(list(w[key].values())) for w in expected if w[key]]
        assert summary[key] == pytest.approx(100 * plain_mean(cases))
        # The KDPO fork: each kind over the cases that have it.
        for kind in {k for w in expected for k in w[key]}:
            having = [w[key][kind] for w in expected if kind in w[key]]
            assert summary[f"{key}/{kind}"] == pytest.approx(100 * plain_mean(having))
    assert "fluency" not in summary


def test_locality_is_100_for_an_unchanged_model(models, bpe_tokenizer):
    pre, _ = models
    evaluator = EditEvaluator(bpe_tokenizer, REQUESTS, fluency=False)
    evaluator.snapshot_pre(pre)
    summary = evaluator.summarize(evaluator.evaluate(pre))
    assert summary["locality"] == 100.0
    assert summary["locality/Relation_Specificity"] == summary["locality/Forgetfulness"] == 100.0


def test_summarize_in_parts_equals_whole(models, bpe_tokenizer):
    pre, post = models
    evaluator = EditEvaluator(bpe_tokenizer, REQUESTS, fluency=True, max_new_tokens=12)
    evaluator.snapshot_pre(pre)
    rows = evaluator.evaluate(post)
    parts = evaluator.evaluate(post, [0, 1]) + evaluator.evaluate(post, [2, 3])
    assert [r["index"] for r in parts] == [0, 1, 2, 3]
    assert evaluator.summarize(parts) == pytest.approx(evaluator.summarize(rows))
    assert evaluator.summarize(rows)["fluency"] == pytest.approx(plain_mean([r["fluency"] for r in rows]))
