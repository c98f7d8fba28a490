"""The edit engine on tiny random-init LLaMA, Qwen2 and GPT-2 models."""
import pytest
import torch
from conftest import tiny_model

from kdpo_lightning.data import EditRequest, encode
from kdpo_lightning.loop import EditConfig, run_edit
from kdpo_lightning.module import KDPOEditor
from kdpo_lightning.policy import Policy, default_layer, select_trainable
from kdpo_lightning.reference import make_reference

PROMPT, TARGET = "Which family does Epaspidoceras belong to?", "Noctuidae"


def _edit(arch, tokenizer, *, method="kdpo", reference="cached", prefix_cache=True, config=None, seed=0):
    model = tiny_model(arch, seed=seed)
    policy = Policy(model, prefix_cache=prefix_cache)
    encoded = encode(tokenizer, PROMPT, TARGET)
    config = config or EditConfig(method=method, lr=1e-3)
    optimizer = torch.optim.Adam(policy.params.values(), lr=config.lr)
    ref = make_reference(reference) if reference else None
    record = run_edit(policy, ref, torch.tensor([encoded.input_ids]), encoded.target_start, config, optimizer)
    return model, policy, record


def _greedy_target(model, tokenizer):
    encoded = encode(tokenizer, PROMPT, TARGET)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, encoded.target_start - 1 : -1]
    return logits.argmax(-1).tolist(), list(encoded.target_ids)


def test_default_layer_follows_paper():
    assert default_layer(32) == 21 and default_layer(30) == 20 and default_layer(12) == 8


def test_edit_flips_greedy_output_and_stops_early(arch, bpe_tokenizer):
    model, _, record = _edit(arch, bpe_tokenizer)
    pred, target = _greedy_target(model, bpe_tokenizer)
    assert pred == target
    assert record.success and record.cycles < 10 and record.steps == 8 * record.cycles


def test_only_the_selected_tensor_changes(arch, bpe_tokenizer):
    before = {n: p.detach().clone() for n, p in tiny_model(arch).named_parameters()}
    model, policy, record = _edit(arch, bpe_tokenizer)
    assert record.steps > 0
    (trained,) = policy.params
    for name, param in model.named_parameters():
        if name == trained:
            assert not torch.equal(param, before[name])
        else:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("method", ["kdpo", "dpo"])
def test_reference_strategies_agree(arch, bpe_tokenizer, method):
    """cached, swap and copy give the same per-step losses and the same final tensor."""
    fixed = EditConfig(method=method, lr=1e-3, n_cycles=3, n_steps=4, early_stop=False)
    names = ["swap", "copy"] + (["cached"] if method == "kdpo" else [])
    runs = {name: _edit(arch, bpe_tokenizer, reference=name, config=fixed) for name in names}
    _, base_policy, base = runs["swap"]
    assert base.steps == 12
    for name, (_, policy, record) in runs.items():
        assert record.losses == pytest.approx(base.losses, abs=1e-6), name
        for key, param in policy.params.items():
            torch.testing.assert_close(param, base_policy.params[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["kdpo", "dpo", "ftm"])
def test_prefix_cache_is_exact(arch, bpe_tokenizer, method):
    # apart from CUDA graphs: a captured step may take other kernels for the other shapes of a full forward
    fixed = EditConfig(method=method, lr=1e-3, n_cycles=3, n_steps=4, early_stop=False, cuda_graphs=False)
    reference = {"kdpo": "cached", "dpo": "swap", "ftm": None}[method]
    _, cached_policy, cached = _edit(arch, bpe_tokenizer, reference=reference, config=fixed)
    _, full_policy, full = _edit(arch, bpe_tokenizer, reference=reference, config=fixed, prefix_cache=False)
    assert cached_policy.start == 2 and full_policy.start is None
    assert cached.losses == pytest.approx(full.losses, abs=1e-6)
    for key, param in cached_policy.params.items():
        torch.testing.assert_close(param, full_policy.params[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["kdpo", "dpo", "ftm"])
def test_methods_run_end_to_end(bpe_tokenizer, method):
    model = tiny_model("llama")
    editor = KDPOEditor.from_model(model, bpe_tokenizer, method=method, lr=1e-3)
    record = editor.edit(EditRequest(prompt=PROMPT, target_new=TARGET, subject="Epaspidoceras"))
    assert record.success and record.failed is None
    assert record.first_loss is not None and record.last_loss < record.first_loss
    assert _greedy_target(model, bpe_tokenizer)[0] == _greedy_target(model, bpe_tokenizer)[1]


def test_pattern_matching_nothing_lists_close_names():
    with pytest.raises(ValueError, match=r"matches no parameter.*model\.layers\.2\.mlp\.down_proj\.weight"):
        select_trainable(tiny_model("llama"), r"model\.layers\.2\.mlp\.down_prj\.weight")
