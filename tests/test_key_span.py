"""`constraints.key_span`: each update kept within the span of the edit's own keys. Checked against an
independent projector (a pseudo-inverse of the keys read by a hook) and against the unconstrained edit."""
import pytest
import torch
from conftest import tiny_model

from kdpo_lightning.constraints import KeySpan, projection_module
from kdpo_lightning.data import EditRequest, encode
from kdpo_lightning.module import KDPOEditor
from kdpo_lightning.objective import span_basis

PROMPT, TARGET = "Which family does Epaspidoceras belong to?", "Noctuidae"
FIRST = EditRequest(PROMPT, TARGET, "Epaspidoceras")
SECOND = EditRequest("What voice type is Louise Grandjean?", "soprano", "Louise Grandjean")


def test_span_basis_is_an_orthonormal_basis_of_the_keys_rows():
    torch.manual_seed(0)
    keys = torch.randn(6, 3) @ torch.randn(3, 12)  # 6 keys of width 12, rank 3
    basis = span_basis(keys)
    assert basis.shape == (12, 3)
    torch.testing.assert_close(basis.T @ basis, torch.eye(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(keys @ basis @ basis.T, keys, atol=1e-4, rtol=1e-5)
    assert span_basis(torch.zeros(4, 12)).shape == (12, 0)


def _keys(model, name: str, *texts_ids: list[int]) -> torch.Tensor:
    """The projection's inputs at every position but the last of each sequence, from full forwards (float64)."""
    found = []
    handle = projection_module(model, name).register_forward_pre_hook(lambda mod, args: found.append(args[0][0, :-1]))
    with torch.no_grad():
        for ids in texts_ids:
            model(input_ids=torch.tensor([ids]))
    handle.remove()
    return torch.cat(found).double()


def _projected(delta: torch.Tensor, keys: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """delta with its input side projected onto the keys' row span, P = pinv(K) K."""
    P = torch.linalg.pinv(keys) @ keys
    return P @ delta.double() if conv1d else delta.double() @ P


def _edit(arch: str, bpe_tokenizer, dtype=torch.float32, **hparams):
    editor = KDPOEditor.from_model(tiny_model(arch).to(dtype), bpe_tokenizer, lr=1e-3, **hparams)
    (name,) = editor.policy.params
    before = editor.policy.original_values()[name]
    record = editor.edit(FIRST)
    return editor, name, record, editor.policy.params[name].detach() - before


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # a Linear and a Conv1D projection
def test_key_span_edit_is_the_unconstrained_edit_projected_onto_its_keys(bpe_tokenizer, arch):
    """Same losses, y_l and steps as the paper's edit, and a weight change equal to the paper's change
    projected onto the span of the edit's keys: every step's update is the same, then projected."""
    _, _, free, free_delta = _edit(arch, bpe_tokenizer)
    editor, name, spanned, delta = _edit(arch, bpe_tokenizer, key_span=True)
    assert isinstance(editor.policy.constraints[0], KeySpan)
    assert free.steps >= 8
    assert (spanned.steps, spanned.cycles, spanned.success) == (free.steps, free.cycles, free.success)
    torch.testing.assert_close(torch.tensor(spanned.losses), torch.tensor(free.losses), rtol=1e-4, atol=1e-6)
    keys = _keys(tiny_model(arch), name, encode(bpe_tokenizer, PROMPT, TARGET).input_ids)  # untrained: same keys
    conv1d = arch == "gpt2"
    expected = _projected(free_delta, keys, conv1d)
    torch.testing.assert_close(delta.double(), expected, rtol=0, atol=1e-5 * float(free_delta.abs().max()))
    assert (free_delta.double() - expected).norm() > 0.1 * free_delta.norm()  # the paper's change leaves the span


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_span_with_a_replay_stays_in_the_span_of_the_edit_and_its_replay(bpe_tokenizer, dtype):
    """The second edit rehearses the first: its change lies in the span of both edits' keys, not of its own alone.
    In bf16 the fp32 master holds the change (the model's tensor is its rounding)."""
    editor, name, first, _ = _edit("llama", bpe_tokenizer, dtype, key_span=True, replay=1)
    assert first.success
    before = editor.policy.params[name].detach().clone()
    second = editor.edit(SECOND)
    delta = editor.policy.params[name].detach() - before
    assert second.replays == 1 and second.steps > 0
    ids = [encode(bpe_tokenizer, r.prompt, r.target_new).input_ids for r in (FIRST, SECOND)]
    model = tiny_model("llama").to(dtype)
    both, own = _keys(model, name, *ids), _keys(model, name, ids[1])
    scale = float(delta.abs().max())
    torch.testing.assert_close(delta.double(), _projected(delta, both, False), rtol=0, atol=1e-4 * scale)
    assert (delta.double() - _projected(delta, own, False)).abs().max() > 1e-2 * scale
