"""Evaluation plumbing: left padding == unpadded, batched generation, pre-edit state, results file."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from test_metrics import REQUESTS

from kdpo_lightning.data import encode
from kdpo_lightning.generation import generate_texts, left_pad
from kdpo_lightning.evaluate import (
    EditEvaluator, format_table, teacher_forced_argmax, write_results,
)

PAIRS = [
    ("What university did Watts Humphrey attend?", "University of Michigan"),
    ("Who is the father of Alice Aycock?", "John"),
    ("Which river?", "The Rio Grande, which flows from Colorado to the Gulf of Mexico"),
    ("The mother of Mary Ann Cotton is whom?", "Margaret Robson"),
]


@pytest.mark.parametrize("tokenizer_name", ["bpe_tokenizer", "sp_tokenizer"])
def test_left_padded_batch_matches_one_by_one(arch, tokenizer_name, request):
    tokenizer = request.getfixturevalue(tokenizer_name)
    model = tiny_model(arch)
    rows = [encode(tokenizer, p, a).input_ids for p, a in PAIRS]
    ids, mask, positions = left_pad(rows, tokenizer.pad_token_id, torch.device("cpu"))
    assert (mask == 0).any(), "the batch must contain padding"
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for b, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            torch.testing.assert_close(batched[b, ids.shape[1] - len(row):], alone, atol=1e-5, rtol=1e-4)

    together = teacher_forced_argmax(model, tokenizer, PAIRS, batch_size=len(PAIRS))
    for (pred, label), pair in zip(together, PAIRS):
        alone_pred, alone_label = teacher_forced_argmax(model, tokenizer, [pair], batch_size=1)[0]
        assert torch.equal(pred, alone_pred) and torch.equal(label, alone_label)
        assert label.tolist() == list(encode(tokenizer, *pair).target_ids)


def plain_greedy(model, tokenizer, prompt: str, n: int) -> str:
    """No cache, no padding: rerun the whole sequence for every new token."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_batched_greedy_generation_matches_plain_loop(arch, bpe_tokenizer):
    model = tiny_model(arch)
    prompts = [p for p, _ in PAIRS]
    texts = generate_texts(model, bpe_tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert texts == [plain_greedy(model, bpe_tokenizer, p, 8).replace("\n\n", " ") for p in prompts]
    assert all(t.startswith(p) for t, p in zip(texts, prompts))


def test_top_k_sampling_is_seeded(bpe_tokenizer):
    model = tiny_model("llama")
    prompts = [p for p, _ in PAIRS]

    def sample(seed: int) -> list[str]:
        generator = torch.Generator().manual_seed(seed)
        return generate_texts(model, bpe_tokenizer, prompts, max_new_tokens=10, sampling="top_k",
                              generator=generator)

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    with pytest.raises(ValueError, match="beam"):
        generate_texts(model, bpe_tokenizer, prompts, sampling="beam")
    with pytest.raises(ValueError, match="beam"):
        EditEvaluator(bpe_tokenizer, REQUESTS, fluency_sampling="beam")


def test_pre_snapshot_survives_json_and_model_mode(bpe_tokenizer):
    pre, post = tiny_model("llama"), tiny_model("llama", seed=1)
    evaluator = EditEvaluator(bpe_tokenizer, REQUESTS, fluency=False)
    with pytest.raises(RuntimeError, match="snapshot_pre"):
        evaluator.evaluate(post)
    evaluator.snapshot_pre(pre)
    post.train()
    rows = evaluator.evaluate(post)
    assert post.training, "evaluate() must restore the model's mode"

    resumed = EditEvaluator(bpe_tokenizer, REQUESTS, fluency=False)
    resumed.load_state_dict(json.loads(json.dumps(evaluator.state_dict())))
    assert resumed.evaluate(post) == rows
    with pytest.raises(ValueError, match="pre_locality"):
        EditEvaluator(bpe_tokenizer, REQUESTS[:2], fluency=False).load_state_dict(evaluator.state_dict())


def test_write_results_holds_every_field(tmp_path):
    rows = [{"index": 0, "source": "t#0", "edit_success": 1.0, "rephrase": None,
             "portability": {"Reasoning": 0.5}, "portability_mean": 0.5, "locality": {},
             "locality_mean": None, "fluency": 5.1}]
    records = [{"index": 0, "cycles": 3, "steps": 17, "first_loss": 0.69, "last_loss": 0.01, "success": True,
                "seconds": 1.5}]
    summary = {"edit_success": 100.0, "portability": 50.0, "portability/Reasoning": 50.0, "fluency": 5.1}
    path = write_results(tmp_path / "out" / "results.json", config={"lr": 1e-4}, model="tiny", dataset="zsre",
                         method="kdpo", rows=rows, edit_records=records, summary=summary)
    data = json.loads(path.read_text())
    assert data == {"config": {"lr": 1e-4}, "model": "tiny", "dataset": "zsre", "method": "kdpo",
                    "n_edits": 1, "summary": summary, "requests": [{**records[0], **rows[0]}]}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left behind
    with pytest.raises(ValueError, match="index"):
        write_results(path, config={}, model="m", dataset="d", method="k", rows=rows,
                      edit_records=[{"index": 7}], summary={})


def test_format_table_lists_the_numbers():
    table = format_table({"edit_success": 97.5, "rephrase": 80.25, "portability": 41.0,
                          "portability/Reasoning": 30.0, "locality": 88.125,
                          "locality/Relation_Specificity": 88.125, "fluency": 5.4321,
                          "edits_succeeded": 75.0})
    lines = table.splitlines()
    assert [line.split()[0] for line in lines] == ["Edit", "Rephrase", "Portability", "Reasoning", "Locality",
                                                   "Relation_Specificity", "Fluency", "edits_succeeded"]
    for number in ("97.50", "80.25", "41.00", "30.00", "88.12", "5.43", "75.00"):
        assert number in table
    assert len({line.rindex(".") for line in lines}) == 1  # decimal points line up
