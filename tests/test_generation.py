"""Generated-answer metrics: normalization, the stop rule, the chat template, greedy answers against a
plain loop, pre-edit generated scores, and scripted or bigram LMs whose answers are known by
construction, including a target reached only under teacher forcing."""
import json
from itertools import takewhile

import pytest
import torch
from conftest import make_bpe_tokenizer, tiny_model
from transformers.modeling_outputs import CausalLMOutputWithPast

from kdpo_lightning.data import EditRequest, SequentialEditDataModule, encode
from kdpo_lightning.evaluate import EditEvaluator
from kdpo_lightning.generation import (
    contains, exact_match, first_answer, greedy_answers, normalize_answer, stop_token_ids,
)
from kdpo_lightning.loop import EditConfig
from kdpo_lightning.module import KDPOEditor

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_text(prompt: str) -> str:
    """CHAT_TEMPLATE rendered by hand for one user turn and the assistant's header."""
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chat_tokenizer():
    """The conftest BPE tokenizer with ChatML's two special tokens and a small ChatML template."""
    tokenizer = make_bpe_tokenizer()
    tokenizer.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


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


@pytest.mark.parametrize("text, answer, ended", [
    ("Paris. It is the capital", "Paris.", True),
    ("Paris", "Paris", False),
    ("Paris.", "Paris.", False),  # "3." may still become "3.14": only the end of decoding decides
    ("Paris\nRome", "Paris", True),
    ("Rome\n\nParis.", "Rome", True),
    (" \n Paris is big! Yes", "Paris is big!", True),  # leading blank lines are skipped
    ("Is it? No", "Is it?", True),
    ("pi is 3.14 exactly. So", "pi is 3.14 exactly.", True),
    ("The U.S. Army. More", "The U.S. Army.", True),
    ("John F. Kennedy was", "John F. Kennedy was", False),
    ("St. Louis, Missouri.\nYes", "St. Louis, Missouri.", True),
    ('He said "Paris." Then', 'He said "Paris."', True),
    ("", "", False),
])
def test_first_answer(text, answer, ended):
    assert first_answer(text) == (answer, ended)


class Scripted(torch.nn.Module):
    """A causal LM that says `script` (one-hot logits in `dtype`), then EOS, whatever it is given.
    Records the prompt rows it is given (padding removed) and counts its forwards."""

    def __init__(self, tokenizer, script: list[int], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.dtype_anchor = torch.nn.Parameter(torch.zeros((), dtype=dtype))
        self.vocab, self.script, self.eos = len(tokenizer), script, tokenizer.eos_token_id
        self.prompts: list[list[int]] = []
        self.forwards = 0
        self.step = 0

    def forward(self, input_ids, attention_mask, past_key_values=None, cache=None, **_) -> CausalLMOutputWithPast:
        if past_key_values is None and cache is None:  # a prompt: the script starts again
            self.prompts += [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
            self.step = 0
        token = self.script[self.step] if self.step < len(self.script) else self.eos
        self.step, self.forwards = self.step + 1, self.forwards + 1
        logits = torch.zeros(*input_ids.shape, self.vocab, dtype=self.dtype_anchor.dtype)
        logits[..., token] = 1.0
        return CausalLMOutputWithPast(logits=logits, past_key_values=())


DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_prompt_goes_through_the_chat_template(chat_tokenizer, bpe_tokenizer, dtype):
    requests = [EditRequest(PROMPT, "Paris", "Alice Aycock"), EditRequest("Which river?", "Nile", "river")]
    model = Scripted(chat_tokenizer, ids(chat_tokenizer, "Paris."), dtype)
    evaluator = EditEvaluator(chat_tokenizer, requests, fluency=False, generation=True)
    assert evaluator.chat_template  # None: on, since the tokenizer has a template
    evaluator.generated_right_after(model, [0, 1])
    expected = [ids(chat_tokenizer, chat_text(r.prompt)) for r in requests]
    assert expected[0][0] == chat_tokenizer.convert_tokens_to_ids("<|im_start|>")  # one special token
    assert sorted(model.prompts) == sorted(expected)

    bare = Scripted(chat_tokenizer, ids(chat_tokenizer, "Paris."), dtype)
    EditEvaluator(chat_tokenizer, requests, chat_template=False).generated_right_after(bare, [0, 1])
    assert sorted(bare.prompts) == sorted(chat_tokenizer(r.prompt)["input_ids"] for r in requests)
    assert not EditEvaluator(bpe_tokenizer, requests).chat_template  # no template: off
    with pytest.raises(ValueError, match="no chat template"):
        EditEvaluator(bpe_tokenizer, requests, chat_template=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("script, answer, decided_by", [
    ("Paris. It is big", "Paris.", "Paris. "),  # the space after the period ends the sentence
    ("Paris\nRome is big", "Paris", "Paris\n"),
    ("Is it? Yes it is", "Is it?", "Is it? "),
    ("3.14 meters. Yes", "3.14 meters.", "3.14 meters. "),  # "3." was not the end
    ("The U.S. Army. Yes", "The U.S. Army.", "The U.S. Army. "),
    ("Paris<|im_end|> Rome", "Paris", "Paris<|im_end|>"),  # the template's end of turn
    ("Paris<|endoftext|> Rome", "Paris", "Paris<|endoftext|>"),  # EOS
])
def test_decoding_stops_at_the_first_sentence_end_newline_or_stop_token(chat_tokenizer, dtype, script, answer,
                                                                        decided_by):
    script_ids, needed = ids(chat_tokenizer, script), ids(chat_tokenizer, decided_by)
    assert script_ids[:len(needed)] == needed and len(needed) < len(script_ids)
    model = Scripted(chat_tokenizer, script_ids, dtype)
    assert greedy_answers(model, chat_tokenizer, [PROMPT], max_new_tokens=30, chat_template=True) == [answer]
    assert model.forwards == len(needed)  # decoding stopped there; the rest of the script was never asked for


def test_decoding_keeps_a_max_token_bound(chat_tokenizer):
    model = Scripted(chat_tokenizer, ids(chat_tokenizer, "Paris Rome Berlin London Madrid"))
    got = greedy_answers(model, chat_tokenizer, [PROMPT], max_new_tokens=4, chat_template=True)
    assert got == [chat_tokenizer.decode(ids(chat_tokenizer, "Paris Rome Berlin London Madrid")[:4])]
    assert model.forwards == 4


def _plain_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> str:
    """One prompt, full forwards without a cache for all `max_new_tokens`, then the text before the first
    stop token cut by the rule."""
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            new.append(int(model(input_ids=torch.tensor([prompt_ids + new])).logits[0, -1].argmax()))
    stops = stop_token_ids(tokenizer)
    return first_answer(tokenizer.decode(list(takewhile(lambda t: t not in stops, new))))[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chat", [False, True])
def test_greedy_answers_equal_a_plain_loop(chat_tokenizer, chat, dtype):
    model = tiny_model("llama", vocab_size=len(chat_tokenizer)).to(dtype)
    prompts = ["Who is the father of Alice Aycock?", "Which river?", "What voice type is Louise Grandjean?"]
    got = greedy_answers(model, chat_tokenizer, prompts, max_new_tokens=6, batch_size=2, chat_template=chat)
    rows = [ids(chat_tokenizer, chat_text(p)) if chat else chat_tokenizer(p)["input_ids"] for p in prompts]
    assert got == [_plain_greedy(model, chat_tokenizer, row, 6) for row in rows]


def test_a_named_decode_shows_its_progress_and_answers_the_same(chat_tokenizer, capsys):
    model = tiny_model("llama", vocab_size=len(chat_tokenizer))
    prompts = ["Who is the father of Alice Aycock?", "Which river?", "What voice type is Louise Grandjean?"]
    quiet = greedy_answers(model, chat_tokenizer, prompts, max_new_tokens=4, batch_size=2)
    assert capsys.readouterr().err == ""
    shown = greedy_answers(model, chat_tokenizer, prompts, max_new_tokens=4, batch_size=2, progress="answers")
    assert shown == quiet
    err = capsys.readouterr().err
    assert "answers:" in err and "0/2 [" in err  # 3 prompts in 2 batches; the bar is cleared when done


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


@pytest.mark.parametrize("said", ["Paris.", "Paris", "Paris. It is in France.", "paris!"])
def test_paris_with_or_without_a_period_scores_em_1(chat_tokenizer, said):
    model = Scripted(chat_tokenizer, ids(chat_tokenizer, said))
    evaluator = EditEvaluator(chat_tokenizer, [EditRequest(PROMPT, "Paris", "Alice Aycock")], fluency=False,
                              generation=True)
    evaluator.snapshot_pre(model)
    row = evaluator.evaluate(model)[0]
    assert row["gen_answer"] == first_answer(said)[0]
    assert row["gen_edit_success_em"] == 1.0 and row["gen_edit_success_contains"] == 1.0
    assert evaluator.generated_right_after(model, [0]) == [{"gen_edit_success_em": 1.0,
                                                            "gen_edit_success_contains": 1.0}]


def test_generated_right_after_is_one_batched_decode(chat_tokenizer):
    requests = [EditRequest(PROMPT, "Paris, France", "Alice Aycock"), EditRequest("Which river?", "Rome", "river"),
                EditRequest("Which city?", "France", "city")]
    model = Scripted(chat_tokenizer, ids(chat_tokenizer, "Paris, France. Yes"))
    evaluator = EditEvaluator(chat_tokenizer, requests, generation=True)
    got = evaluator.generated_right_after(model, [2, 0, 1])
    assert got == [{"gen_edit_success_em": 0.0, "gen_edit_success_contains": 1.0},
                   {"gen_edit_success_em": 1.0, "gen_edit_success_contains": 1.0},
                   {"gen_edit_success_em": 0.0, "gen_edit_success_contains": 0.0}]
    assert len(model.prompts) == 3 and model.forwards == len(ids(chat_tokenizer, "Paris, France. "))


EDITED = EditRequest(PROMPT, "Rome", "Alice Aycock", rephrase=("Alice Aycock's father is who?",),
                     portability={"Reasoning": (("In which country is he?", ("Italy",)),)},
                     locality={"Relation_Specificity": (("Which river?", ("Nile",)),)})


def test_pre_edit_generated_scores_in_rows_summary_and_state(chat_tokenizer):
    """The unedited model says "Paris." to every prompt, the edited one "Rome.": the edit prompt and the
    rephrase go from 0 to 1, the locality answer changed, and portability ("Italy") is 0 before and after."""
    pre = Scripted(chat_tokenizer, ids(chat_tokenizer, "Paris. Yes"))
    post = Scripted(chat_tokenizer, ids(chat_tokenizer, "Rome.\nYes"))
    evaluator = EditEvaluator(chat_tokenizer, [EDITED], fluency=False, generation=True)
    evaluator.snapshot_pre(pre)
    assert evaluator.state_dict()["pre_generated"] == [["Paris."] * 4]  # edit, rephrase, portability, locality
    row = evaluator.evaluate(post)[0]
    expected = {"gen_edit_success_em": (1.0, 0.0), "gen_edit_success_contains": (1.0, 0.0),
                "gen_rephrase_em": (1.0, 0.0), "gen_rephrase_contains": (1.0, 0.0),
                "gen_portability_em": (0.0, 0.0), "gen_portability_contains": (0.0, 0.0),
                "gen_locality": (0.0, 1.0), "gen_answer": ("Rome.", "Paris.")}
    assert {k: (row[k], row[f"pre_{k}"]) for k in expected} == expected
    keys = [k for k in row if "gen_" in k]
    assert keys == [k for key in expected for k in (key, f"pre_{key}")]  # each pre_gen_* beside its gen_*

    summary = evaluator.summarize([row])
    assert summary["gen_edit_success_em"] == 100.0 and summary["pre_gen_edit_success_em"] == 0.0
    assert summary["gen_locality"] == 0.0 and summary["pre_gen_locality"] == 100.0
    assert summary["pre_gen_rephrase_contains"] == 0.0 and summary["pre_gen_portability_em"] == 0.0

    forwards = pre.forwards
    resumed = EditEvaluator(chat_tokenizer, [EDITED], fluency=False, generation=True)
    resumed.load_state_dict(json.loads(json.dumps(evaluator.state_dict())))
    assert resumed.evaluate(post) == [row] and pre.forwards == forwards

    bare = EditEvaluator(chat_tokenizer, [EDITED], fluency=False, generation=True, chat_template=False)
    with pytest.raises(ValueError, match="decoded with"):
        bare.load_state_dict(evaluator.state_dict())
    without = EditEvaluator(chat_tokenizer, [EDITED], fluency=False)
    without.snapshot_pre(pre)
    with pytest.raises(ValueError, match="no pre-edit generated answers"):
        resumed.load_state_dict(without.state_dict())
    with pytest.raises(RuntimeError, match="snapshot_pre"):
        EditEvaluator(chat_tokenizer, [EditRequest(PROMPT, "Rome", "A")], generation=True).evaluate(post)


def test_a_light_evaluation_decodes_only_the_edit_prompt(chat_tokenizer):
    """`full=False` (curve points before the last edit): one generated answer per request, the edit
    prompt's, and no fluency text; its other scores equal the full row's."""
    pre = Scripted(chat_tokenizer, ids(chat_tokenizer, "Paris. Yes"))
    post = Scripted(chat_tokenizer, ids(chat_tokenizer, "Rome.\nYes"))
    evaluator = EditEvaluator(chat_tokenizer, [EDITED], fluency=True, generation=True)
    evaluator.snapshot_pre(pre)
    full = evaluator.evaluate(post)[0]
    decoded_full = len(post.prompts)
    light = evaluator.evaluate(post, full=False)[0]
    assert decoded_full - (len(post.prompts) - decoded_full) == 4  # the fluency text, rephrase, portability, locality
    skipped = {"fluency", *(f"{pre}gen_{field}" for pre in ("", "pre_") for field in
                            ("rephrase_em", "rephrase_contains", "portability_em", "portability_contains", "locality"))}
    assert full["fluency"] is not None and full["gen_rephrase_em"] == 1.0 and full["gen_locality"] == 0.0
    assert {k: v for k, v in light.items() if k not in skipped} == {k: v for k, v in full.items() if k not in skipped}
    assert all(light[k] is None for k in skipped)
    assert light["gen_edit_success_em"] == 1.0 and light["pre_gen_edit_success_em"] == 0.0
    summary = evaluator.summarize([light])
    assert "gen_rephrase_em" not in summary and summary["gen_edit_success_contains"] == 100.0


def test_encode_through_the_chat_template(chat_tokenizer, bpe_tokenizer, tmp_path):
    """edit.chat_template: c+y_w is the prompt as one user turn, then the target as the assistant's answer; the
    data module encodes its edits so too, and refuses a tokenizer without a template."""
    head = ids(chat_tokenizer, chat_text(PROMPT))
    encoded = encode(chat_tokenizer, PROMPT, " Rome", chat_template=True)
    assert encoded.input_ids == tuple(head + ids(chat_tokenizer, "Rome")) and encoded.target_start == len(head)
    assert encode(chat_tokenizer, PROMPT, "Rome") == encode(chat_tokenizer, PROMPT, "Rome", chat_template=False)

    path = tmp_path / "edits.json"
    path.write_text(json.dumps([{"prompt": PROMPT, "target_new": "Rome", "subject": "Alice Aycock"}]))
    data = SequentialEditDataModule(str(path), format="knowedit")
    data.set_tokenizer(chat_tokenizer, chat_template=True)
    row = data.edits()[0]
    assert tuple(row["input_ids"].tolist()) == encoded.input_ids and row["target_start"] == encoded.target_start
    with pytest.raises(ValueError, match="no chat template"):
        data.set_tokenizer(bpe_tokenizer, chat_template=True)
    with pytest.raises(ValueError, match="chat_template works with methods"):
        EditConfig(method="memit", chat_template=True)


def test_an_edit_through_the_chat_template_is_the_generated_answer(chat_tokenizer):
    """With edit.chat_template and train_stop, an edit that holds (argmax = y_w, then EOS, under teacher forcing
    after the templated prompt) is exactly what greedy decoding through the template answers."""
    request = EditRequest(PROMPT, "Rome", "Alice Aycock")
    model = tiny_model("llama", vocab_size=len(chat_tokenizer))
    assert greedy_answers(model, chat_tokenizer, [PROMPT], max_new_tokens=8, chat_template=True) != ["Rome"]
    editor = KDPOEditor.from_model(model, chat_tokenizer, lr=1e-3, n_cycles=10, n_steps=8, chat_template=True,
                                   train_stop=True)
    assert editor.encode(request).input_ids[-1] != chat_tokenizer.eos_token_id  # EOS is added at the edit
    assert editor.edit(request).success
    assert greedy_answers(editor.lm, chat_tokenizer, [PROMPT], max_new_tokens=8, chat_template=True) == ["Rome"]
