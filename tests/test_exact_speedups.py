"""The exact speed-ups of an edit's forwards, each against the path without it: losses to 1e-6 in fp32
(bitwise in bf16 where the arithmetic is the same), and proof that the work is really skipped.

- c+y_w runs without its last token (its row predicts nothing);
- the reference's rows on c+y_w are the policy's first forward, for every reference strategy;
- the projection cache replays the trained layer's residual and the trained projection's input;
- the LM head runs as (W @ x^T)^T for a few fp32 rows on CPU;
- Adam runs its fused kernel on CPU.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model
from families import FAMILIES, tiny_family_model

from kdpo_lightning import policy as policy_module
from kdpo_lightning.data import encode
from kdpo_lightning.loop import EditConfig, make_optimizer, run_edit
from kdpo_lightning.policy import SKINNY_HEAD_ROWS, Policy, skinny_linear, target_rows
from kdpo_lightning.reference import make_reference

PROMPT, TARGET = "Which family does Epaspidoceras belong to?", "Noctuidae"
FIXED = EditConfig(lr=1e-3, n_cycles=2, n_steps=3, early_stop=False)
LAYER_MODE = {"gemma2", "gemma3_text", "olmo2", "exaone4",  # a norm after the MLP's output
              "phi", "gptj", "codegen", "gpt_neox", "falcon",  # parallel attention: attn + mlp + residual
              "qwen2_moe"}  # the shared expert's output is gated
"""Families whose trained layer is not `residual + projection output`: the projection cache keeps layer mode."""


def _policy(model, **kwargs) -> Policy:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Policy(model, **kwargs)


def _edit(policy, tokenizer, config=FIXED, reference="cached", method=None):
    config = config if method is None else EditConfig(method=method, lr=1e-3, n_cycles=2, n_steps=3, early_stop=False)
    encoded = encode(tokenizer, PROMPT, TARGET)
    optimizer = torch.optim.Adam(policy.params.values(), lr=config.lr)
    return run_edit(policy, make_reference(reference), torch.tensor([encoded.input_ids]), encoded.target_start,
                    config, optimizer)


def _full_input_rows(model, n_target: int, input_ids: torch.Tensor) -> torch.Tensor:
    """The rows as computed before: every token run, the row past the end dropped, the head as F.linear."""
    logits = model(input_ids=input_ids, logits_to_keep=n_target + 1, use_cache=False).logits
    return logits[:, :-1].float().log_softmax(-1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_without_the_last_token_equal_rows_of_the_full_input(bpe_tokenizer, arch, monkeypatch):
    monkeypatch.setattr(policy_module, "SKINNY_HEAD_ROWS", range(0))  # this test is about the input alone
    model = tiny_model(arch)
    encoded = encode(bpe_tokenizer, PROMPT, TARGET)
    ids, n = torch.tensor([encoded.input_ids]), len(encoded.target_ids)
    with torch.no_grad():
        torch.testing.assert_close(target_rows(model, n, input_ids=ids), _full_input_rows(model, n, ids),
                                   atol=1e-6, rtol=0)

    runs = []
    for rows in (_full_input_rows, target_rows):
        monkeypatch.setattr(policy_module, "target_rows", rows)
        runs.append(_edit(_policy(tiny_model(arch), prefix_cache=False), bpe_tokenizer).losses)
    assert len(runs[0]) == 6 and runs[1] == pytest.approx(runs[0], abs=1e-6)


@pytest.mark.parametrize("reference", ["cached", "swap", "copy"])
def test_no_reference_runs_a_forward_for_the_edits_own_input(bpe_tokenizer, reference):
    """The policy's first forward gives the reference's rows on c+y_w: swap and copy add no forward to a
    KDPO edit (they did one each), and the rows equal a forward of the model as it was."""
    model = tiny_model("llama")
    encoded = encode(bpe_tokenizer, PROMPT, TARGET)
    ids, n = torch.tensor([encoded.input_ids]), len(encoded.target_ids)
    with torch.no_grad():
        expected = target_rows(tiny_model("llama"), n, input_ids=ids)
    policy, ref = _policy(model), make_reference(reference)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))  # a deepcopy carries it along
    optimizer = torch.optim.Adam(policy.params.values(), lr=FIXED.lr)
    record = run_edit(policy, ref, ids, encoded.target_start, FIXED, optimizer)
    assert record.steps == 6
    # the prefix cache's capture and (first input only) its check, the first forward, then per cycle
    # two step forwards (the first step reuses the rows before it) and the cycle's closing forward
    assert len(forwards) == 2 + 1 + 2 * 3
    torch.testing.assert_close(ref.rows(ids, n), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_projection_cache_equals_the_layer_input_cache(bpe_tokenizer, family, dtype):
    """Projection mode (taken where the check finds `residual + projection output`) gives the losses and
    tensors of the layer-input cache: to 1e-6 in fp32, bitwise in bf16; elsewhere layer mode is kept."""
    runs = {}
    for projection in (None, False):  # None: decided by the check; False: layer mode from the start
        policy = _policy(tiny_family_model(family, dtype=dtype))
        if projection is False:
            policy._prefix.projection = False
        runs[projection] = policy, _edit(policy, bpe_tokenizer).losses
    (decided, losses), (layer, layer_losses) = runs[None], runs[False]
    assert decided._prefix.projection == (family not in LAYER_MODE)
    if dtype == torch.bfloat16:
        assert losses == layer_losses
    else:
        assert losses == pytest.approx(layer_losses, abs=1e-6)
    for name, value in decided.params.items():
        torch.testing.assert_close(value, layer.params[name], atol=1e-6 if dtype == torch.float32 else 0, rtol=0)


@pytest.mark.parametrize("method", ["kdpo", "dpo", "ftm"])
def test_projection_mode_runs_the_trained_layers_attention_once_per_input(bpe_tokenizer, method):
    """Steps run only the trained projection in its layer: attention and the MLP's input side run in the
    capture of each input (and, once, in the check), not at every step."""
    reference = {"kdpo": "cached", "dpo": "swap", "ftm": "cached"}[method]
    counts = {}
    for projection in (None, False):
        model = tiny_model("llama")
        policy = _policy(model)
        if projection is False:
            policy._prefix.projection = False
        layer = model.model.layers[policy.start]
        calls = {"attention": 0, "projection": 0}
        layer.self_attn.register_forward_pre_hook(lambda *args: calls.__setitem__("attention", calls["attention"] + 1))
        layer.mlp.down_proj.register_forward_pre_hook(
            lambda *args: calls.__setitem__("projection", calls["projection"] + 1))
        record = _edit(policy, bpe_tokenizer, reference=reference, method=method)
        counts[projection] = calls, record.losses
    (projected, losses), (full, layer_losses) = counts[None], counts[False]
    assert losses == pytest.approx(layer_losses, abs=1e-6)
    if method == "dpo":  # y_l is generated by full forwards, which run the layer in both modes
        assert projected["attention"] < full["attention"]
    else:  # projection: the capture and the check; layer mode: the first forward, then 3 per cycle
        assert (projected["attention"], full["attention"]) == (2, 1 + 2 * 3)
        assert projected["projection"] == full["projection"] + 2  # capture and check run it too


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 12])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_equals_linear_with_its_gradient(rows, bias):
    torch.manual_seed(0)
    weight, b = torch.randn(512, 64) * 0.1, (torch.randn(512) if bias else None)
    x = torch.randn(1, rows, 64, requires_grad=True)
    grad = torch.randn(1, rows, 512)
    out = skinny_linear(x, weight, b)
    (dx,) = torch.autograd.grad(out, x, grad)
    x2 = x.detach().clone().requires_grad_()
    expected = F.linear(x2, weight, b)
    (dx2,) = torch.autograd.grad(expected, x2, grad)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)  # a few ulps: another summation order
    torch.testing.assert_close(dx, dx2, atol=1e-6, rtol=1e-6)
    if rows not in SKINNY_HEAD_ROWS:  # the layout is only used where it was measured faster
        assert torch.equal(out, expected)
    bf16 = x.detach().to(torch.bfloat16)
    assert torch.equal(skinny_linear(bf16, weight.to(torch.bfloat16)), F.linear(bf16, weight.to(torch.bfloat16)))


def test_skinny_head_edit_equals_the_linear_head_edit_and_is_put_back(bpe_tokenizer, monkeypatch):
    assert len(encode(bpe_tokenizer, PROMPT, TARGET).target_ids) in SKINNY_HEAD_ROWS
    calls = []
    real = policy_module.skinny_linear
    monkeypatch.setattr(policy_module, "skinny_linear", lambda *args: calls.append(1) or real(*args))
    runs = []
    for rows in (SKINNY_HEAD_ROWS, range(0)):
        monkeypatch.setattr(policy_module, "SKINNY_HEAD_ROWS", rows)
        model = tiny_model("llama")
        runs.append(_edit(_policy(model), bpe_tokenizer).losses)
        assert "forward" not in model.lm_head.__dict__
    assert calls and runs[0] == pytest.approx(runs[1], abs=1e-6)


def test_a_head_forward_someone_else_set_is_left_alone(bpe_tokenizer):
    """A guest does not replace a forward another library installed (accelerate's hooks): it runs as set."""
    model = tiny_model("llama")
    head, calls = model.lm_head, []
    head.forward = lambda x: calls.append(1) or F.linear(x, head.weight)
    own = head.forward
    _edit(_policy(model), bpe_tokenizer)
    assert calls and head.__dict__["forward"] is own


def test_fused_adam_edit_equals_the_default_adam_edit(bpe_tokenizer):
    """`make_optimizer` takes Adam's fused kernel on CPU: the same losses and weights as the default Adam."""
    runs = []
    for make in (make_optimizer, lambda params, lr: torch.optim.Adam(params, lr=lr)):
        policy = _policy(tiny_model("llama").cpu())
        optimizer = make(policy.params.values(), FIXED.lr)
        encoded = encode(bpe_tokenizer, PROMPT, TARGET)
        ids = torch.tensor([encoded.input_ids], device="cpu")
        runs.append((run_edit(policy, make_reference("cached"), ids, encoded.target_start, FIXED, optimizer),
                     next(iter(policy.params.values())).detach().clone(), optimizer.param_groups[0]["fused"]))
    (fused, fused_weight, is_fused), (default, default_weight, _) = runs
    assert is_fused and fused.losses == pytest.approx(default.losses, abs=1e-6)
    torch.testing.assert_close(fused_weight, default_weight, atol=1e-6, rtol=0)
    assert not make_optimizer([torch.zeros(2, device="meta")], 1e-3).param_groups[0]["fused"]
