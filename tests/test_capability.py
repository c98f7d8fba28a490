"""General capability: the harness's prompt formats, and multiple-choice accuracy against a plain loop."""
import json

import pytest
import torch
from conftest import FIXTURES, tiny_model

from kdpo_lightning import sources
from kdpo_lightning.capability import Question, load_questions, loglikelihoods, score

QUESTIONS = [
    Question(("The capital of France is",) * 3, (" Paris", " Rome", " a small green dog"), 0),
    Question(("Water boils at",) * 2, (" 100 degrees", " minus forty"), 1),
    Question(("Sarah was a better surgeon than Maria so Sarah", "Sarah was a better surgeon than Maria so Maria"),
             (" got the harder cases.",) * 2, 0),
    Question(("Question: How do I dry a towel?\nAnswer:",) * 2, (" Hang it in the sun.", " Put it in a pond."), 0),
]


def _plain_loglik(model, tokenizer, context: str, continuation: str) -> float:
    """One pair, unbatched: sum of log p of each continuation token given everything before it."""
    whole = tokenizer(context + continuation)["input_ids"]
    start = len(tokenizer(context)["input_ids"])
    with torch.no_grad():
        logps = model(input_ids=torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(logps[t - 1, whole[t]]) for t in range(start, len(whole)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_accuracy_equals_a_plain_loop(arch, bpe_tokenizer):
    model = tiny_model(arch)
    pairs = [(c, k) for q in QUESTIONS for c, k in zip(q.contexts, q.continuations)]
    batched = loglikelihoods(model, bpe_tokenizer, pairs, batch_size=3)
    plain = [_plain_loglik(model, bpe_tokenizer, c, k) for c, k in pairs]
    assert batched == pytest.approx(plain, abs=1e-4)
    lls = iter(plain)
    acc = norm = 0
    for q in QUESTIONS:
        scores = [next(lls) for _ in q.continuations]
        acc += scores.index(max(scores)) == q.label
        normed = [s / len(k[1:]) for s, k in zip(scores, q.continuations)]  # per character, space excluded
        norm += normed.index(max(normed)) == q.label
    assert score(model, bpe_tokenizer, "piqa", QUESTIONS) == pytest.approx(
        {"acc": 100 * acc / len(QUESTIONS), "acc_norm": 100 * norm / len(QUESTIONS)})
    assert set(score(model, bpe_tokenizer, "mmlu", QUESTIONS)) == {"acc"}


@pytest.fixture
def fixture_data(monkeypatch):
    monkeypatch.setattr(sources, "data_dirs", lambda: [FIXTURES])


def test_harness_prompt_formats(fixture_data):
    mmlu = load_questions("mmlu")[0]
    assert mmlu.contexts[0] == ("The following are multiple choice questions (with answers) about abstract algebra."
                                "\n\nFind the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over "
                                "Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert mmlu.continuations == (" A", " B", " C", " D") and mmlu.label == 1
    hella = load_questions("hellaswag")[0]
    assert hella.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
    assert hella.continuations[3] == " starts pulling up roofing on a roof." and hella.label == 3
    piqa = load_questions("piqa")[0]
    assert piqa.contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.label == json.loads((FIXTURES / "general/piqa/piqa_validation.jsonl").read_text().splitlines()[0])["label"]
    wino = load_questions("winogrande")[0]
    assert wino.contexts == ("Sarah was a much better surgeon than Maria so Sarah",
                             "Sarah was a much better surgeon than Maria so Maria")
    assert wino.continuations == (" always got the easier cases.",) * 2 and wino.label == 1


def test_a_json_string_holding_a_line_separator_is_one_record(tmp_path, monkeypatch):
    """MMLU has questions with U+2028 inside: str.splitlines() would cut those records in two."""
    (tmp_path / "general" / "mmlu").mkdir(parents=True)
    record = {"question": "A\u2028B?", "subject": "x", "choices": ["1", "2", "3", "4"], "answer": 0}
    (tmp_path / "general" / "mmlu" / "mmlu_test.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n")
    monkeypatch.setattr(sources, "data_dirs", lambda: [tmp_path])
    (question,) = load_questions("mmlu")
    assert "A\u2028B?" in question.contexts[0]


def test_seeded_subset(fixture_data):
    assert load_questions("mmlu", n=2, seed=1) == load_questions("mmlu", n=2, seed=1)
    assert len(load_questions("mmlu", n=2, seed=1)) == 2 and len(load_questions("mmlu", n=10)) == 3
    with pytest.raises(ValueError, match="capability benchmark must be one of"):
        load_questions("arc")
