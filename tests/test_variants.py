"""The objective variants for long edit sequences: their math on small tensors, and in an edit."""
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from kdpo_lightning import sources
from kdpo_lightning.constraints import NormBound, NullSpace, cached_covariances, key_covariances, projection_module
from kdpo_lightning.data import EditRequest, encode
from kdpo_lightning.loop import EditConfig
from kdpo_lightning.module import KDPOEditor
from kdpo_lightning.objective import bound_change, kdpo_loss, nll_anchored, null_space_projector

PROMPT, TARGET = "Which family does Epaspidoceras belong to?", "Noctuidae"


def test_nll_anchor_adds_alpha_times_the_mean_nll_of_y_w():
    torch.manual_seed(0)
    rows = torch.randn(3, 7).log_softmax(-1)
    ref = torch.randn(3, 7).log_softmax(-1)
    y_w, y_l = torch.tensor([1, 2, 3]), torch.tensor([1, 5, 6])
    base = kdpo_loss(rows, ref, y_w, y_l, beta=0.1)
    nll = -(float(rows[0, 1]) + float(rows[1, 2]) + float(rows[2, 3])) / 3
    assert float(nll_anchored(base, rows, y_w, 0.5)) == pytest.approx(float(base) + 0.5 * nll, abs=1e-6)
    assert nll_anchored(base, rows, y_w, 0.0) is base


def test_null_space_projector_annihilates_the_keys():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(8, 3))  # 3 keys in 8 dimensions
    P = null_space_projector(torch.tensor(keys @ keys.T / 3, dtype=torch.float32), threshold=1e-6)
    P = P.double().cpu().numpy()
    _, _, vt = np.linalg.svd(keys.T)  # independent: the null space of K^T from an SVD
    null = vt[3:].T
    np.testing.assert_allclose(P, null @ null.T, atol=1e-5)
    np.testing.assert_allclose(P @ P, P, atol=1e-5)
    delta = rng.normal(size=(4, 8))  # any update dW (out 4, in 8), projected, leaves the keys' outputs alone
    np.testing.assert_allclose((delta @ P) @ keys, 0, atol=1e-5)


def test_bound_change_scales_only_changes_past_the_bound():
    original = torch.tensor([[3.0, 4.0]])  # norm 5
    inside = torch.tensor([[3.5, 4.0]])
    assert torch.equal(bound_change(inside, original, 0.2), inside)  # change 0.5 <= 1
    far = torch.tensor([[3.0, 7.0]])  # change (0, 3), norm 3 > 1
    torch.testing.assert_close(bound_change(far, original, 0.2), torch.tensor([[3.0, 5.0]]))


def _editor(bpe_tokenizer, **hparams):
    return KDPOEditor.from_model(tiny_model("llama"), bpe_tokenizer, lr=1e-3, **hparams)


def test_nll_anchor_in_an_edit(bpe_tokenizer):
    """At the first step KDPO's loss is log 2 exactly (policy == reference); the anchor adds alpha x NLL."""
    request = EditRequest(PROMPT, TARGET, "Epaspidoceras")
    plain = _editor(bpe_tokenizer).edit(request)
    anchored_editor = _editor(bpe_tokenizer, nll_alpha=0.3)
    encoded = encode(bpe_tokenizer, PROMPT, TARGET)
    with torch.no_grad():
        logps = anchored_editor.lm(input_ids=torch.tensor([encoded.input_ids])).logits[0].log_softmax(-1)
    nll = -sum(float(logps[t - 1, encoded.input_ids[t]]) for t in range(encoded.target_start, len(encoded.input_ids)))
    nll /= len(encoded.target_ids)
    anchored = anchored_editor.edit(request)
    assert plain.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert anchored.losses[0] == pytest.approx(math.log(2) + 0.3 * nll, abs=1e-5)
    assert EditConfig(nll_alpha=0.3).nll_alpha == 0.3
    with pytest.raises(ValueError, match="nll_alpha"):
        EditConfig(nll_alpha=-1)


def test_key_covariances_of_two_layers_match_full_forwards_and_skip_the_layers_above(bpe_tokenizer):
    model = tiny_model("llama")
    modules = {f"layer{i}": model.get_submodule(f"model.layers.{i}.mlp.down_proj") for i in (2, 1)}
    batches = [torch.tensor([bpe_tokenizer(t)["input_ids"]]) for t in ("Who wrote Hamlet?", "Water boils.")]
    keys = {name: [] for name in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: keys[n].append(args[0][0].double()))
               for n, m in modules.items()]
    with torch.no_grad():
        for ids in batches:
            model(input_ids=ids)
    for handle in handles:
        handle.remove()
    top_calls = []
    handle = model.get_submodule("model.layers.3").register_forward_pre_hook(lambda mod, args: top_calls.append(1))
    covariances = key_covariances(model, modules, batches)
    handle.remove()
    assert top_calls == []  # every forward stopped at layer 2, the deeper of the two
    for name, parts in keys.items():
        k = torch.cat(parts)
        torch.testing.assert_close(covariances[name].double(), k.T @ k / len(k), rtol=1e-5, atol=1e-7)


def test_null_space_edit_leaves_preserved_outputs_and_protects_earlier_edits(bpe_tokenizer):
    editor = _editor(bpe_tokenizer)
    (name,) = editor.policy.params
    module = projection_module(editor.lm, name)
    texts = ["The capital of France is Paris.", "Water boils at one hundred degrees.", "Who wrote Hamlet?"]
    batches = [torch.tensor([bpe_tokenizer(t)["input_ids"]]) for t in texts]
    (covariance,) = key_covariances(editor.lm, {name: module}, batches).values()
    null_space = NullSpace(editor.lm, {name: covariance}, threshold=1e-6)
    editor.policy.constraints.append(null_space)
    before = editor.policy.params[name].detach().clone()

    def keys_of(ids):
        keys = []
        handle = module.register_forward_pre_hook(lambda mod, args: keys.append(args[0][0]))
        with torch.no_grad():
            editor.lm(input_ids=ids)
        handle.remove()
        return keys[0]

    preserved = torch.cat([keys_of(ids) for ids in batches])  # from full forwards, unlike key_covariances
    expected = preserved.double().T @ preserved.double() / len(preserved)
    torch.testing.assert_close(covariance.double(), expected, rtol=1e-5, atol=1e-7)
    record = editor.edit(EditRequest(PROMPT, TARGET, "Epaspidoceras"))
    assert record.steps > 0 and null_space.n_edits == 1
    delta = editor.policy.params[name].detach() - before
    assert delta.abs().max() > 1e-4  # it did change
    assert (delta @ preserved.T).abs().max() < 1e-4 * delta.abs().max() * preserved.abs().max()
    edited = torch.tensor([encode(bpe_tokenizer, PROMPT, TARGET).input_ids])
    edit_keys = keys_of(edited)[encode(bpe_tokenizer, PROMPT, TARGET).target_start - 1 : -1]
    second_before = editor.policy.params[name].detach().clone()
    editor.edit(EditRequest("What voice type is Louise Grandjean?", "soprano", "Louise Grandjean"))
    second = editor.policy.params[name].detach() - second_before
    assert (second @ edit_keys.T).abs().max() < 1e-3 * second.abs().max() * edit_keys.abs().max()


def test_norm_bound_holds_over_a_sequence(bpe_tokenizer):
    editor = _editor(bpe_tokenizer, max_change=0.01)
    (name,) = editor.policy.params
    original = editor.policy.params[name].detach().clone()
    for target in ("Noctuidae", "Geometridae", "Erebidae"):
        editor.edit(EditRequest(PROMPT, target, "Epaspidoceras"))
    change = (editor.policy.params[name].detach() - original).norm()
    assert change <= 0.01 * original.norm() * (1 + 1e-5)
    assert change > 0.009 * original.norm()  # the bound was reached, so it was active
    assert isinstance(editor.policy.constraints[0], NormBound)


def test_a_zero_covariance_protects_nothing():
    """No keys: the projector is the identity (not 0, which would block every update)."""
    assert torch.equal(null_space_projector(torch.zeros(5, 5), threshold=0.01), torch.eye(5))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # a Linear and a Conv1D projection
def test_no_preserved_text_is_zero_covariances_without_data_or_disk(bpe_tokenizer, arch, tmp_path, monkeypatch):
    monkeypatch.setenv("KDPO_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setattr(sources, "data_dirs", lambda: [])  # reading any text would fail
    model = tiny_model(arch)
    editor = KDPOEditor.from_model(model, bpe_tokenizer)
    (name,) = editor.policy.params
    covariances = cached_covariances(model, bpe_tokenizer, [name], 0, "org/tiny", torch.device("cpu"))
    width = {"llama": 128, "gpt2": 256}[arch]  # the projection's input: the MLP's width
    assert torch.equal(covariances[name], torch.zeros(width, width))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="0 or more"):
        cached_covariances(model, bpe_tokenizer, [name], -1, "org/tiny", torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_null_space_of_earlier_edits_only_protects_their_keys_and_lets_the_next_edit_land(bpe_tokenizer, dtype):
    """`nullspace_texts: 0`: before any edit P = I (the first edit is free); after it, later updates leave
    that edit's keys (the projection's inputs at the positions predicting y_w, read here from a full
    forward) where they were, and the next edit still succeeds."""
    editor = KDPOEditor.from_model(tiny_model("llama").to(dtype), bpe_tokenizer, lr=1e-3,
                                   nullspace_threshold=1e-4, nullspace_texts=0)
    editor._ensure_constraints()
    (null_space,) = editor.policy.constraints
    (name,) = editor.policy.params
    assert isinstance(null_space, NullSpace) and torch.equal(null_space.projectors[name], torch.eye(128))
    module = projection_module(editor.lm, name)
    first = encode(bpe_tokenizer, PROMPT, TARGET)
    keys = []
    handle = module.register_forward_pre_hook(lambda mod, args: keys.append(args[0][0].float()))
    with torch.no_grad():
        editor.lm(input_ids=torch.tensor([first.input_ids]))
    handle.remove()
    edit_keys = keys[0][first.target_start - 1 : -1]

    assert editor.edit(EditRequest(PROMPT, TARGET, "Epaspidoceras")).success
    assert null_space.n_edits == 1
    projector = null_space.projectors[name]
    assert (edit_keys @ projector).abs().max() < 1e-4 * edit_keys.abs().max()  # P k ~ 0 (P symmetric)
    assert torch.trace(projector) > 128 - 2 * len(edit_keys)  # the rest of the space stays free
    before = editor.policy.params[name].detach().clone()  # the fp32 master (bf16: the model's is rounded)
    second = editor.edit(EditRequest("What voice type is Louise Grandjean?", "soprano", "Louise Grandjean"))
    delta = editor.policy.params[name].detach() - before
    assert second.success and second.steps > 0
    assert (delta @ edit_keys.T).abs().max() < 1e-3 * delta.abs().max() * edit_keys.abs().max()
