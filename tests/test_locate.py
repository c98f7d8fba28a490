"""MEMIT and AlphaEdit (`locate.py`): the closed forms against independent least-squares solutions on small
tensors, AlphaEdit's null space (dW K0 ~ 0), and edits of tiny random models in fp32 and bf16.

The agreement with the official AlphaEdit code on SmolLM2 is checked by bench/alphaedit_check.py."""
from __future__ import annotations

import copy
import math
import dataclasses

import pytest
import torch

from conftest import DEMO_ZSRE, tiny_model
from kdpo_lightning.constraints import key_covariances, projection_inputs, projection_module
from kdpo_lightning.data import EditRequest, load_requests
from kdpo_lightning.locate import (
    LocateConfig,
    LocateThenEdit,
    _fact,
    alphaedit_update,
    default_layers,
    edited_weight_names,
    memit_update,
    null_space,
    rival_and_found,
    spread_residual,
)
from kdpo_lightning.objective import ftm_loss
from kdpo_lightning.policy import target_rows

TINY = LocateConfig(layers=[1], v_weight_decay=1e-3, clamp_norm_factor=4.0, mom2_update_weight=1.0, l2=1e-4,
                    nullspace_threshold=1e-8, n_context_templates=0)
"""Settings for a random-init 64-wide model, whose hidden states and keys are tens of times smaller than a
trained model's (the official weight decay, clamp, lambda and l2 are scaled for those). No generated templates: at
random init a key depends much on its context, so averaging keys over garbled templates blurs the edit
(the template path is checked against the official code by bench/alphaedit_check.py, and below)."""
TARGETS = ["mother", "living", "family", "status", "country", "father"]
"""Single tokens of the test BPE: at random init, a change at the subject's last token reaches later
positions only faintly, so the subject is the prompt's last word and y_w is one token."""


def tiny(arch: str = "llama") -> torch.nn.Module:
    """conftest's tiny model with its output head x8: at random init its logits span ~1, too little for a
    changed hidden state to lift one token clearly above the other 511."""
    model = tiny_model(arch)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8)
    return model


def requests(n: int) -> list[EditRequest]:
    records = load_requests(DEMO_ZSRE)[:n]
    return [EditRequest(prompt=r.prompt, subject=r.prompt.split()[-1], target_new=t) for r, t in zip(records, TARGETS)]


def preserved(tokenizer) -> list[torch.Tensor]:
    """4 texts, 112 tokens: fewer keys than the 128 dimensions of a down_proj input, so C has an exact null space."""
    texts = [r.prompt + " " + r.target_new for r in load_requests(DEMO_ZSRE)[20:24]]
    return [torch.tensor([tokenizer(text)["input_ids"]]) for text in texts]


def covariances(model, tokenizer, layers) -> dict[str, torch.Tensor]:
    names = edited_weight_names(model, layers)
    return key_covariances(model, {n: projection_module(model, n) for n in names}, preserved(tokenizer))


def test_default_layers_scale_the_official_llama3_layers() -> None:
    assert default_layers(32) == [4, 5, 6, 7, 8]  # hparams/AlphaEdit/Llama3-8B.json
    assert default_layers(30) == [4, 5, 6, 7, 8]  # SmolLM2-135M
    assert default_layers(24) == [3, 4, 5, 6]
    assert default_layers(64) == list(range(8, 18))
    assert default_layers(4) == [1]
    assert default_layers(2) == [1] and default_layers(1) == [0]
    for n in range(1, 100):
        assert all(4 / 32 <= l / n < 9 / 32 for l in default_layers(n)) or len(default_layers(n)) == 1


@pytest.mark.parametrize("bad", [dict(layers=[]), dict(layers=[3, 2]), dict(layers=[1, 1]), dict(layers=[-1]),
                                 dict(v_lr=0), dict(l2=-1), dict(kl_factor=-0.1), dict(v_num_grad_steps=0),
                                 dict(context_template_length=1)])
def test_config_rejects_bad_values(bad) -> None:
    with pytest.raises(ValueError):
        LocateConfig(**bad)


def _problem(seed: int = 0, d_in: int = 12, d_out: int = 7, n: int = 3, n0: int = 8):
    g = torch.Generator(torch.empty(0).device).manual_seed(seed)  # the default device (KDPO_TEST_DEVICE)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    K, R = randn(d_in, n), randn(d_out, n)
    K0 = randn(d_in, n0)  # preserved keys: rank 8 of 12
    Kp = randn(d_in, 2)  # keys of earlier edits
    return K, R, K0, Kp


def test_memit_update_is_the_least_squares_solution() -> None:
    """min ||dW K - R||^2 + lambda ||dW L||^2, C = L L^T, solved by lstsq on the stacked system."""
    K, R, K0, _ = _problem()
    C = K0 @ K0.T / K0.shape[1] + 0.1 * torch.eye(12, dtype=torch.float64)
    lam = 3.0
    L = torch.linalg.cholesky(C)
    A = torch.cat([K, lam ** 0.5 * L], dim=1)  # (in, n + in)
    B = torch.cat([R, torch.zeros(7, 12, dtype=torch.float64)], dim=1)
    expected = torch.linalg.lstsq(A.T, B.T).solution.T
    torch.testing.assert_close(memit_update(K.float(), R.float(), C.float(), lam), expected, rtol=1e-4, atol=1e-5)


def test_null_space_is_the_complement_of_the_preserved_keys() -> None:
    _, _, K0, _ = _problem()
    C = K0 @ K0.T / 8
    P = null_space(C, 1e-8)
    torch.testing.assert_close(P, P.T)
    torch.testing.assert_close(P @ P, P)
    assert round(float(P.trace())) == 12 - 8
    assert (P @ K0).abs().max() < 1e-10
    assert round(float(null_space(1e-12 * C, 1e-8).trace())) == 12  # absolute threshold, as the official code


def test_alphaedit_update_solves_the_projected_problem_and_spares_preserved_keys() -> None:
    """dW = B U^T with U a basis of C's null space and B the ridge solution of
    min ||B U^T K - R||^2 + ||B U^T K_p||^2 + l2 ||B||^2 (lstsq), the paper's objective in that basis."""
    K, R, K0, Kp = _problem()
    C = K0 @ K0.T / 8
    values, vectors = torch.linalg.eigh(C)
    U = vectors[:, values < 1e-8]  # (12, 4)
    l2 = 0.5
    A = torch.cat([U.T @ K, U.T @ Kp, l2 ** 0.5 * torch.eye(4, dtype=torch.float64)], dim=1)
    B = torch.cat([R, torch.zeros(7, 2 + 4, dtype=torch.float64)], dim=1)
    expected = torch.linalg.lstsq(A.T, B.T).solution.T @ U.T
    delta = alphaedit_update(K, R, null_space(C, 1e-8), Kp @ Kp.T, l2)
    torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-10)
    assert (delta @ K0).norm() < 1e-10 * delta.norm() * K0.norm()
    memit = memit_update(K, R, C + 1e-3 * torch.eye(12, dtype=torch.float64), 1.0)
    assert (memit @ K0).norm() > 1e-3 * memit.norm() * K0.norm()  # without the projection they move


def test_spread_residual_divides_by_the_layers_left() -> None:
    R = torch.full((3, 2), 10.0, dtype=torch.float64)
    assert [float(spread_residual(R, i, 5)[0, 0]) for i in range(5)] == [2.0, 2.5, 10 / 3, 5.0, 10.0]


def test_edited_weight_names_find_the_output_projection() -> None:
    assert edited_weight_names(tiny_model("llama"), [1, 2]) == ["model.layers.1.mlp.down_proj.weight",
                                                                 "model.layers.2.mlp.down_proj.weight"]
    assert edited_weight_names(tiny_model("gpt2"), [1]) == ["transformer.h.1.mlp.c_proj.weight"]
    with pytest.raises(ValueError, match="out of range"):
        edited_weight_names(tiny_model("llama"), [4])


def test_first_target_loss_is_the_nll_of_y_w_read_at_the_loss_layer(bpe_tokenizer) -> None:
    """delta = 0 and no generated template: the first loss is the mean NLL of y_w after the bare prompt,
    read at the last layer or, with v_loss_layer, at a model cut above that layer."""
    model = tiny_model("llama")
    request = load_requests(DEMO_ZSRE)[0]
    ids = torch.tensor([bpe_tokenizer(request.prompt + " " + request.target_new)["input_ids"]])
    n = ids.shape[1] - len(bpe_tokenizer(request.prompt)["input_ids"])
    cut = copy.deepcopy(model)
    cut.model.layers = cut.model.layers[:3]
    cut.config.num_hidden_layers = 3
    for loss_layer, reader in ((-1, model), (2, cut)):
        config = dataclasses.replace(TINY, n_context_templates=0, v_num_grad_steps=1, v_loss_layer=loss_layer)
        editor = LocateThenEdit(model, bpe_tokenizer, "memit", config, covariances(model, bpe_tokenizer, [1]))
        record = editor.edit([request])[0]
        expected = ftm_loss(target_rows(reader, n, input_ids=ids)[0], ids[0, -n:])
        assert record.losses == [pytest.approx(expected.item(), rel=1e-5)] and record.steps == 0


def target_value_and_rows(bpe_tokenizer, config: LocateConfig):
    """z and the losses of the first request's target value on a tiny model, and the rows over y_w of a plain
    forward whose edited layer (1) outputs z at the subject's last token."""
    model = tiny()
    editor = LocateThenEdit(model, bpe_tokenizer, "memit", config, covariances(model, bpe_tokenizer, [1]))
    request = requests(1)[0]
    fact = _fact(bpe_tokenizer, request)
    z, losses = editor._target_value(fact)
    subject_end = len(bpe_tokenizer(request.prompt)["input_ids"]) - 1

    def write_z(module, args, output):
        output = output.clone()
        output[0, subject_end] = z
        return output

    handle = model.model.layers[1].register_forward_hook(write_z)
    try:
        rows = target_rows(model, len(fact.y_w), input_ids=torch.tensor([fact.input_ids]))[0]
    finally:
        handle.remove()
    return fact, losses, rows


def test_last_target_loss_is_the_nll_of_a_full_forward_with_z_written_in(bpe_tokenizer) -> None:
    """The target-value steps replay the layers below the edited one; the last loss must still be the NLL of
    y_w from a plain forward whose edited layer outputs z at the subject's last token (no KL, no decay)."""
    config = dataclasses.replace(TINY, v_num_grad_steps=6, v_weight_decay=0.0, kl_factor=0.0, v_stop_loss=0.0)
    fact, losses, rows = target_value_and_rows(bpe_tokenizer, config)
    expected = ftm_loss(rows, torch.tensor(fact.y_w))
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert losses[-1] == pytest.approx(expected.item(), rel=1e-5)


def test_keys_average_the_bare_prompt_with_the_generated_templates(bpe_tokenizer) -> None:
    """Key = (bare prompt's key + the generated templates' mean key) / 2 at the subject's last token, each
    read here from its own unpadded forward (the editor reads them from one right-padded batch)."""
    model = tiny()
    editor = LocateThenEdit(model, bpe_tokenizer, "memit", dataclasses.replace(TINY, n_context_templates=3),
                            covariances(model, bpe_tokenizer, [1]))
    assert len(editor.templates) == 4 and editor.templates[0] == ""
    assert all(t.endswith(". ") and "{" not in t for t in editor.templates[1:])
    name = editor.names[0]
    module = projection_module(model, name)
    requests_ = load_requests(DEMO_ZSRE)[:2]  # subjects inside the prompts
    expected = []
    for r in requests_:
        keys = []
        for prefix in editor.templates:
            ids = bpe_tokenizer(prefix + r.prompt)["input_ids"]
            end = len(bpe_tokenizer(prefix + r.prompt[: r.prompt.index(r.subject) + len(r.subject)])["input_ids"]) - 1
            keys.append(projection_inputs(model, {name: module}, torch.tensor([ids]))[name][0, end])
        expected.append((keys[0] + torch.stack(keys[1:]).mean(0)) / 2)
    got = editor._keys(name, [_fact(bpe_tokenizer, r) for r in requests_])
    torch.testing.assert_close(got, torch.stack(expected, dim=1), rtol=1e-5, atol=1e-6)


def test_last_loss_adds_the_kl_of_the_subject_prompt_with_the_delta_written_in(bpe_tokenizer) -> None:
    """With a KL term, the last loss is the bare prompt's NLL plus KL(now || before) of the next token after the
    subject in "{subject} is a", the delta z - h added at the subject's last token (h: that layer's output there)."""
    config = dataclasses.replace(TINY, n_context_templates=0, v_num_grad_steps=4, v_weight_decay=0.0,
                                 kl_factor=1.0, v_stop_loss=0.0)
    model = tiny()
    editor = LocateThenEdit(model, bpe_tokenizer, "memit", config, covariances(model, bpe_tokenizer, [1]))
    request = requests(1)[0]
    fact = _fact(bpe_tokenizer, request)
    z, losses = editor._target_value(fact)

    def forward(ids: list[int], at: int, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token log-probs at every position and the edited layer's output at `at`, delta added there."""
        seen = {}

        def add(module, args, output):
            seen["h"] = output[0, at].clone()
            output = output.clone()
            output[0, at] += delta
            return output

        handle = model.model.layers[1].register_forward_hook(add)
        with torch.no_grad():
            logps = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        handle.remove()
        return logps, seen["h"]

    at = len(bpe_tokenizer(request.prompt)["input_ids"]) - 1
    h = forward(fact.input_ids, at, torch.zeros_like(z))[1]
    logps = forward(fact.input_ids, at, z - h)[0]
    n = len(fact.y_w)
    nll = -logps[-n - 1:-1].gather(-1, torch.tensor(fact.y_w)[:, None]).mean()
    kl_ids = bpe_tokenizer(request.subject + " is a")["input_ids"]
    subject_end = len(bpe_tokenizer(request.subject)["input_ids"]) - 1
    before = forward(kl_ids, subject_end, torch.zeros_like(z))[0][subject_end]
    now = forward(kl_ids, subject_end, z - h)[0][subject_end]
    kl = (now.exp() * (now - before)).sum()
    assert kl > 1e-4 and losses[-1] == pytest.approx((nll + kl).item(), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["memit", "alphaedit"])
def test_edits_make_the_target_the_greedy_answer(method, dtype, bpe_tokenizer) -> None:
    model = tiny()
    covs = covariances(model, bpe_tokenizer, [1])
    model.to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = LocateThenEdit(model, bpe_tokenizer, method, TINY, covs)
    records = editor.edit(requests(1)) + editor.edit(requests(3)[1:])  # one request, then a batch of two
    assert [r.success for r in records] == [True, True, True]
    assert all(r.failed is None and r.steps == len(r.losses) - 1 and r.seconds > 0 for r in records)
    assert all(r.losses[-1] < r.losses[0] for r in records)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}
    assert model.get_parameter("model.layers.1.mlp.down_proj.weight").dtype == dtype


def test_alphaedit_leaves_the_preserved_keys_outputs_unchanged(bpe_tokenizer) -> None:
    """dW K0 ~ 0 on the model: the edited projection's outputs on the preserved texts stay; MEMIT's move."""
    name, moved = "model.layers.1.mlp.down_proj.weight", {}
    for method in ("alphaedit", "memit"):
        model = tiny()
        module = projection_module(model, name)
        keys = torch.cat([projection_inputs(model, {name: module}, ids)[name][0] for ids in preserved(bpe_tokenizer)])
        with torch.no_grad():
            outputs = module(keys)
        editor = LocateThenEdit(model, bpe_tokenizer, method, TINY, covariances(model, bpe_tokenizer, [1]))
        assert all(r.success for r in editor.edit(requests(2)))
        with torch.no_grad():
            moved[method] = float((module(keys) - outputs).norm() / outputs.norm())
    assert moved["alphaedit"] < 1e-5 < moved["memit"]


def test_gpt2_conv1d_is_edited_in_its_layout(bpe_tokenizer) -> None:
    model = tiny("gpt2")
    config = dataclasses.replace(TINY, layers=[1, 2])
    editor = LocateThenEdit(model, bpe_tokenizer, "memit", config, covariances(model, bpe_tokenizer, [1, 2]))
    assert editor.edit(requests(1))[0].success


def test_same_seed_same_edit_and_state_round_trip(bpe_tokenizer) -> None:
    """Two editors with one seed make identical edits; an editor restored from `state_dict` continues as
    the first one would (AlphaEdit's K_p K_p^T and the templates travel in it)."""
    first, second = requests(2)
    runs = []
    config = dataclasses.replace(TINY, n_context_templates=5)
    for resume in (False, True):
        model = tiny()
        covs = covariances(model, bpe_tokenizer, [1])
        editor = LocateThenEdit(model, bpe_tokenizer, "alphaedit", config, covs)
        editor.edit([first])
        if resume:
            state = editor.state_dict()
            editor = LocateThenEdit(model, bpe_tokenizer, "alphaedit", dataclasses.replace(config, seed=1), covs)
            assert editor.templates != state["templates"]
            editor.load_state_dict(state)
            assert editor.templates == state["templates"]
            assert editor.edited["model.layers.1.mlp.down_proj.weight"].abs().sum() > 0
        editor.edit([second])
        runs.append(model.get_parameter("model.layers.1.mlp.down_proj.weight").detach())
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not fit"):
        LocateThenEdit(tiny_model("llama"), bpe_tokenizer, "memit", TINY, covs).load_state_dict(state)


def test_a_non_finite_update_restores_the_weights(bpe_tokenizer) -> None:
    model = tiny_model("llama")
    covs = {n: torch.full_like(c, float("nan")) for n, c in covariances(model, bpe_tokenizer, [1, 2]).items()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = LocateThenEdit(model, bpe_tokenizer, "memit", dataclasses.replace(TINY, layers=[1, 2]), covs)
    records = editor.edit(requests(2))
    assert all(r.failed and "not finite" in r.failed and not r.success for r in records)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_input_is_refused(bpe_tokenizer) -> None:
    model = tiny_model("llama")
    covs = covariances(model, bpe_tokenizer, [1])
    with pytest.raises(ValueError, match="method"):
        LocateThenEdit(model, bpe_tokenizer, "rome", TINY, covs)
    with pytest.raises(ValueError, match="no covariance"):
        LocateThenEdit(model, bpe_tokenizer, "memit", dataclasses.replace(TINY, layers=[1, 2]), covs)
    with pytest.raises(ValueError, match="v_loss_layer"):
        LocateThenEdit(model, bpe_tokenizer, "memit", dataclasses.replace(TINY, v_loss_layer=4), covs)
    editor = LocateThenEdit(model, bpe_tokenizer, "memit", TINY, covs)
    with pytest.raises(ValueError, match="does not occur"):
        editor.edit([EditRequest(prompt="Who wrote it?", target_new="mother", subject="Nobody")])


def test_kdpo_target_value_starts_at_log_2_and_stops_once_y_w_is_the_argmax(bpe_tokenizer) -> None:
    """`v_objective: kdpo`: at delta = 0 the policy is its reference, so the loss is log 2 (no KL, no decay);
    the search stops at a regeneration where y_w is the teacher-forced argmax, read here from a plain forward
    whose edited layer outputs z at the subject's last token; the NLL objective goes on from there."""
    config = dataclasses.replace(TINY, v_num_grad_steps=60, v_lr=0.5, v_objective="kdpo", v_cycle_steps=4)
    fact, losses, rows = target_value_and_rows(bpe_tokenizer, config)
    argmax = rows.argmax(-1)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert 1 < len(losses) < 60 and (len(losses) - 1) % 4 == 0  # stopped at a regeneration, before the budget
    assert argmax.tolist() == list(fact.y_w)
    _, nll_losses, _ = target_value_and_rows(bpe_tokenizer, dataclasses.replace(config, v_objective="nll"))
    assert len(nll_losses) > len(losses)
    with pytest.raises(ValueError, match="v_objective"):
        LocateConfig(v_objective="dpo")


def test_rival_is_the_argmax_at_margin_0_else_the_strongest_other_token() -> None:
    rows = torch.tensor([[0.0, -1.0, -3.0], [-2.0, -0.5, -1.0], [-4.0, -2.0, -0.1]])
    y_w = torch.tensor([0, 1, 2])  # y_w leads by 1.0, 0.5 and 1.9
    y_l, found = rival_and_found(rows, y_w, 0.0)
    assert y_l.tolist() == [0, 1, 2] and found
    y_l, found = rival_and_found(rows, y_w, 0.5)
    assert y_l.tolist() == [1, 2, 1] and found
    assert not rival_and_found(rows, y_w, 0.6)[1]  # the second row leads by 0.5 only
    y_l, found = rival_and_found(rows, torch.tensor([2, 1, 2]), 0.0)  # y_w not the argmax in row 0
    assert y_l.tolist() == [0, 1, 2] and not found
    y_l, found = rival_and_found(rows, torch.tensor([2, 1, 2]), 1.0)
    assert y_l.tolist() == [0, 2, 1] and not found


def test_kdpo_target_value_with_a_margin_leads_every_rival_by_it(bpe_tokenizer) -> None:
    """`v_margin`: z goes on past the argmax until y_w's log-prob leads every other token by the margin, read
    from a plain forward with z written in (the bare prompt's template)."""
    config = dataclasses.replace(TINY, v_num_grad_steps=200, v_lr=0.5, v_objective="kdpo", v_cycle_steps=4)
    fact, argmax_losses, _ = target_value_and_rows(bpe_tokenizer, config)
    fact, losses, rows = target_value_and_rows(bpe_tokenizer, dataclasses.replace(config, v_margin=1.0))
    logps = rows.float().log_softmax(-1)
    y_w = torch.tensor(fact.y_w)
    lead = logps.gather(-1, y_w[:, None])[:, 0] - logps.scatter(-1, y_w[:, None], float("-inf")).max(-1).values
    assert len(argmax_losses) < len(losses) < 200 and (len(losses) - 1) % 4 == 0
    assert lead.min() >= 1.0 - 1e-4
    with pytest.raises(ValueError, match="v_margin"):
        LocateConfig(v_margin=-1.0)
