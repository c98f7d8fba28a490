"""Generated-answer metrics: normalization, greedy answers against a plain loop, and a bigram LM whose
answers are known by construction, including a target reached only under teacher forcing."""
import pytest
import torch
from conftest import tiny_model
from transformers.modeling_outputs import CausalLMOutputWithPast

from kdpo_lightning.data import EditRequest, encode
from kdpo_lightning.evaluate import EditEvaluator
from kdpo_lightning.generation import contains, exact_match, greedy_answers, normalize_answer


@pytest.mark.parametrize("answer, target, em, inside", [
    ("The Eiffel Tower.", "eiffel tower", 1.0, 1.0),
    ("  an  apple ", "Apple", 1.0, 1.0),
    ("female", "male", 0.0, 0.0),
    ("a male singer", "male", 0.0, 1.0),
    ("Paris, France", "paris", 0.0, 1.0),
    ("", "Paris", 0.0, 0.0),
    ("anything", "the", 0.0, 0.0),  # a target that normalizes to nothing is never contained
])
def test_exact_match_and_containment(answer, target, em, inside):
    assert exact_match(answer, target) == em and contains(answer, target) == inside


def test_normalization_is_squads():
    assert normalize_answer("The  Rio-Grande, a river!") == "riogrande river"


def _plain_greedy(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """One prompt, full forwards without a cache, stop at EOS or a token holding a newline."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id or "\n" in tokenizer.decode([token]):
            break
        new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def test_greedy_answers_equal_a_plain_loop(bpe_tokenizer):
    model = tiny_model("llama")
    prompts = ["Who is the father of Alice Aycock?", "Which river?", "What voice type is Louise Grandjean?"]
    got = greedy_answers(model, bpe_tokenizer, prompts, max_new_tokens=6, batch_size=2)
    assert got == [_plain_greedy(model, bpe_tokenizer, p, 6) for p in prompts]


class Bigram(torch.nn.Module):
    """A causal LM whose next-token logits depend only on the current token: `table[token]`."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))

    def set(self, token: int, next_token: int) -> None:
        with torch.no_grad():
            self.table[token].zero_()
            self.table[token, next_token] = 1.0

    def forward(self, input_ids, **_) -> CausalLMOutputWithPast:
        return CausalLMOutputWithPast(logits=self.table[input_ids], past_key_values=())


PROMPT = "Who is the father of Alice Aycock?"


def _bigram_case(tokenizer, target: str, chain: list[int]) -> tuple[Bigram, list[int]]:
    """A bigram LM whose greedy path after PROMPT is `chain` (then EOS); returns it and y_w's ids."""
    encoded = encode(tokenizer, PROMPT, target)
    model = Bigram(len(tokenizer))
    path = [encoded.input_ids[encoded.target_start - 1], *chain, tokenizer.eos_token_id]
    for a, b in zip(path, path[1:]):
        model.set(a, b)
    return model, list(encoded.target_ids)


def _row(model, tokenizer, target: str) -> dict:
    evaluator = EditEvaluator(tokenizer, [EditRequest(PROMPT, target, "Alice Aycock")], fluency=False,
                              generation=True, generation_max_tokens=16)
    evaluator.snapshot_pre(model)
    return evaluator.evaluate(model)[0]


def test_a_target_reached_only_under_teacher_forcing(bpe_tokenizer):
    """y_w = [a, b]: the model says c after the prompt but b after a. Teacher forcing scores 1/2; the
    generated answer is c, which neither matches nor contains the target."""
    target = "Noctuidae"
    a, b, *_ = encode(bpe_tokenizer, PROMPT, target).target_ids
    c = encode(bpe_tokenizer, PROMPT, "Paris").target_ids[0]
    model, y_w = _bigram_case(bpe_tokenizer, target, [c])
    model.set(a, b)
    row = _row(model, bpe_tokenizer, target)
    assert row["edit_success"] == pytest.approx(1 / len(y_w))
    assert row["gen_answer"] == bpe_tokenizer.decode([c]).strip()
    assert row["gen_edit_success_em"] == 0.0 and row["gen_edit_success_contains"] == 0.0


def test_generated_target_scores_and_stops(bpe_tokenizer):
    target = "Noctuidae"
    y_w = list(encode(bpe_tokenizer, PROMPT, target).target_ids)
    exact, _ = _bigram_case(bpe_tokenizer, target, y_w)
    row = _row(exact, bpe_tokenizer, target)
    assert row["edit_success"] == 1.0 and row["gen_answer"] == target
    assert row["gen_edit_success_em"] == 1.0 and row["gen_edit_success_contains"] == 1.0
    more = encode(bpe_tokenizer, PROMPT, f"{target} Paris").target_ids[len(y_w):]  # tokens not in y_w
    longer, _ = _bigram_case(bpe_tokenizer, target, [*y_w, *more])
    row = _row(longer, bpe_tokenizer, target)
    assert row["gen_answer"] == f"{target} Paris"
    assert row["gen_edit_success_em"] == 0.0 and row["gen_edit_success_contains"] == 1.0
    newline = bpe_tokenizer("\n")["input_ids"][0]
    cut, _ = _bigram_case(bpe_tokenizer, target, [*y_w, newline, *more])
    assert _row(cut, bpe_tokenizer, target)["gen_answer"] == target  # stops at the newline


def test_locality_by_generation_compares_with_the_pre_edit_answer(bpe_tokenizer):
    request = EditRequest(PROMPT, "Noctuidae", "Alice Aycock", locality={"n": (("Which river?", ("Nile",)),)})
    model = Bigram(len(bpe_tokenizer))
    last = bpe_tokenizer("Which river?")["input_ids"][-1]
    paris, rome = (encode(bpe_tokenizer, "Which river?", w).target_ids[0] for w in ("Paris", "Rome"))
    model.set(last, paris)
    evaluator = EditEvaluator(bpe_tokenizer, [request], fluency=False, generation=True, generation_max_tokens=4)
    evaluator.snapshot_pre(model)
    assert evaluator.evaluate(model)[0]["gen_locality"] == 1.0
    model.set(last, rome)  # the "edit" changed an unrelated answer
    assert evaluator.evaluate(model)[0]["gen_locality"] == 0.0
    summary = evaluator.summarize(evaluator.evaluate(model))
    assert summary["gen_locality"] == 0.0 and "gen_edit_success_em" in summary
