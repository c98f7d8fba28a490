"""The Policy is a guest in the caller's model: it gives the model back as it came, routes gradients only
during its own edits, and starts each edit from the model's current tensors (fp32 and bf16)."""
import pytest
import torch
from conftest import tiny_model

from kdpo_lightning.data import encode
from kdpo_lightning.loop import EditConfig, run_edit
from kdpo_lightning.policy import Policy
from kdpo_lightning.reference import make_reference
from kdpo_lightning.saving import apply_edit, save_edit

PROMPT, TARGET = "Which family does Epaspidoceras belong to?", "Noctuidae"
FIXED = EditConfig(lr=1e-3, n_cycles=2, n_steps=3, early_stop=False)
DTYPES = [torch.float32, torch.bfloat16]


def _edit(policy: Policy, tokenizer, config: EditConfig = FIXED, target: str = TARGET):
    encoded = encode(tokenizer, PROMPT, target)
    optimizer = torch.optim.Adam(policy.params.values(), lr=config.lr)
    return run_edit(policy, make_reference("cached"), torch.tensor([encoded.input_ids]), encoded.target_start,
                    config, optimizer)


def _marks(model: torch.nn.Module) -> dict:
    """What a guest could leave on a model: flags, gradients, hooks of every kind, instance forwards."""
    return {
        "params": {n: (p.requires_grad, p.grad is None, dict(p._post_accumulate_grad_hooks or {}))
                   for n, p in model.named_parameters()},
        "modules": {n: (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs),
                        dict(m._forward_pre_hooks_with_kwargs), dict(m._backward_hooks), m.__dict__.get("forward"))
                    for n, m in model.named_modules()},
    }


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _trained(policy: Policy) -> tuple[str, torch.Tensor]:
    ((name, param),) = policy.model_params.items()
    return name, param


@pytest.mark.parametrize("dtype", DTYPES)
def test_close_gives_the_model_back_as_it_came(bpe_tokenizer, dtype):
    model = tiny_model("llama").to(dtype)
    model.model.embed_tokens.weight.requires_grad_(False)  # the caller's own flags, hooks and forwards stay
    model.model.layers[0].mlp.register_forward_hook(lambda *args: None)
    model.model.layers[1].register_forward_pre_hook(lambda *args: None)
    layer0 = model.model.layers[0]
    layer0.forward = layer0.forward  # an instance-level forward, as accelerate's hooks set
    before, weights = _marks(model), _weights(model)

    policy = Policy(model)
    assert _marks(model) != before  # it does change the model while it works
    record = _edit(policy, bpe_tokenizer)
    policy.close()
    policy.close()  # harmless

    assert record.steps == 6 and policy.start == 2
    assert _marks(model) == before
    name, _ = _trained(policy)
    assert [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])] == [name]


def test_a_policy_used_as_a_context_manager_is_closed_after_it_and_refuses_to_edit(bpe_tokenizer):
    model = tiny_model("llama").to(torch.bfloat16)
    before = _marks(model)
    with Policy(model) as policy:
        _edit(policy, bpe_tokenizer)
    assert _marks(model) == before
    with pytest.raises(RuntimeError, match="closed"):
        _edit(policy, bpe_tokenizer)


def test_a_second_bf16_policy_edits_once_the_first_is_closed(bpe_tokenizer):
    model = tiny_model("llama").to(torch.bfloat16)
    with Policy(model) as first:
        _edit(first, bpe_tokenizer)
    name, param = _trained(first)
    after_first = param.detach().clone()

    with Policy(model) as second:
        record = _edit(second, bpe_tokenizer, EditConfig(lr=1e-3, n_cycles=30), target="Noct")
    assert record.steps > 0 and record.success
    assert not torch.equal(dict(model.named_parameters())[name], after_first)


def test_an_unclosed_bf16_policy_does_not_take_a_later_policys_gradient(bpe_tokenizer):
    """Its gradient hook stays on the parameter until it is closed, but routes only during its own edits."""
    model = tiny_model("llama").to(torch.bfloat16)
    first = Policy(model)
    _edit(first, bpe_tokenizer)
    name, param = _trained(first)
    first_master = first.params[name].detach().clone()
    after_first = param.detach().clone()

    second = Policy(model)
    record = _edit(second, bpe_tokenizer, EditConfig(lr=1e-3, n_cycles=30), target="Noct")
    assert record.steps > 0 and record.success
    assert not torch.equal(param, after_first)
    assert torch.equal(first.params[name], first_master)  # nothing was routed into the first one's master
    assert param.grad is None and first.params[name].grad is None and second.params[name].grad is None


def test_an_applied_edit_is_kept_by_the_next_bf16_edit(bpe_tokenizer, tmp_path):
    """The master is brought to the model's tensor at each edit's start: a change written from outside
    (`apply_edit`) between two edits is the next edit's starting point, not the stale master."""
    model = tiny_model("llama").to(torch.bfloat16)
    policy = Policy(model)
    _edit(policy, bpe_tokenizer)
    name, param = _trained(policy)
    applied = (param.detach().float() + 0.5).to(torch.bfloat16)
    path = save_edit(tmp_path / "edit.safetensors", {name: applied}, {})

    apply_edit(model, path)
    assert torch.equal(param, applied)
    _edit(policy, bpe_tokenizer, EditConfig(lr=1e-2, n_cycles=1, n_steps=1, early_stop=False))
    change = (param.float() - applied.float()).abs().max()
    assert 0 < change < 0.05  # one Adam step of lr 1e-2 from the applied tensor (the stale master is 0.5 away)
    assert torch.equal(param, policy.params[name].detach().to(torch.bfloat16))


def test_an_unchanged_bf16_tensor_keeps_its_fp32_master_between_edits(bpe_tokenizer):
    """Where the model still holds the master's rounding, bringing the master to the model keeps its
    extra precision (copying the bf16 tensor would drop it at every edit)."""
    model = tiny_model("llama").to(torch.bfloat16)
    policy = Policy(model)
    _edit(policy, bpe_tokenizer)
    name, param = _trained(policy)
    master = policy.params[name].detach().clone()
    assert not torch.equal(master, param.float())  # the master holds more than the model's bf16
    assert torch.equal(policy.original_values()[name], master)  # outside an edit: brought to the model, kept


def test_a_policy_whose_tensor_another_policy_froze_says_so(bpe_tokenizer):
    model = tiny_model("llama")
    first = Policy(model, layer=1)
    Policy(model, layer=2)  # unclosed, and its flags freeze layer 1
    with pytest.raises(RuntimeError, match="another Policy"):
        _edit(first, bpe_tokenizer)
