"""Graph-replayed steps (`graphs.py`) against the eager loop: the same losses and weights.

On CPU the capture is replaced by one that records the function and runs it at each replay: that
checks everything but the CUDA capture itself (which buffers a step reads, when it is captured and
replayed, the fallback). The CUDA test captures real graphs and runs wherever a GPU is present."""
import warnings

import pytest
import torch
from conftest import tiny_model

from kdpo_lightning import graphs
from kdpo_lightning.constraints import NormBound
from kdpo_lightning.data import encode
from kdpo_lightning.loop import EditConfig, run_edit
from kdpo_lightning.policy import Policy
from kdpo_lightning.reference import make_reference

PROMPT, TARGET = "Which family does Epaspidoceras belong to?", "Noctuidae"


class Recorder:
    """A stand-in for `cuda_capture`: records `fn` without running it; a replay runs it."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.captures, self.replays, self.fail_at = 0, 0, fail_at

    def __call__(self, fn, pool=None):
        self.captures += 1
        if self.captures == self.fail_at:
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay():
            self.replays += 1
            fn()

        return replay, pool


def _edit(tokenizer, dtype=torch.float32, device="cpu", policy_state=None, **config):
    """One edit of a tiny LLaMA: its record, the trained tensor after it and before it (fp32).
    `policy_state` (a dict) receives the policy's `capturable` flag after the edit."""
    model = tiny_model("llama").to(device=device, dtype=dtype)
    config = EditConfig(**{"lr": 1e-3, "n_cycles": 3, "n_steps": 4, "early_stop": False, **config})
    encoded = encode(tokenizer, PROMPT, TARGET)
    with Policy(model) as policy:
        (weight,) = policy.params.values()
        start = weight.detach().clone()
        optimizer = torch.optim.Adam(policy.params.values(), lr=config.lr)
        reference = make_reference("cached") if config.method == "kdpo" else None
        ids = torch.tensor([encoded.input_ids], device=device)
        record = run_edit(policy, reference, ids, encoded.target_start, config, optimizer)
        if policy_state is not None:
            policy_state["capturable"] = policy.capturable
        return record, weight.detach().clone(), start


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["kdpo", "ftm"])
def test_replayed_steps_equal_the_eager_loop(bpe_tokenizer, monkeypatch, dtype, method):
    eager, eager_weight, _ = _edit(bpe_tokenizer, dtype, method=method, cuda_graphs=False)
    recorder = Recorder()
    monkeypatch.setitem(graphs.CAPTURES, "cpu", recorder)
    replayed, weight, _ = _edit(bpe_tokenizer, dtype, method=method)
    assert recorder.captures == 2  # the step and the cycle-end forward, once each per edit
    assert recorder.replays == (replayed.steps - 1) + replayed.cycles  # every step but the first; each cycle end
    assert replayed.losses == eager.losses and replayed.steps == eager.steps == 12
    assert replayed.graphed and not eager.graphed and torch.equal(weight, eager_weight)


def test_replayed_steps_keep_the_early_stop(bpe_tokenizer, monkeypatch):
    eager, _, _ = _edit(bpe_tokenizer, n_cycles=10, n_steps=8, early_stop=True, cuda_graphs=False)
    monkeypatch.setitem(graphs.CAPTURES, "cpu", Recorder())
    replayed, _, _ = _edit(bpe_tokenizer, n_cycles=10, n_steps=8, early_stop=True)
    assert replayed.success and (replayed.cycles, replayed.losses) == (eager.cycles, eager.losses)
    assert replayed.cycles < 10


@pytest.mark.parametrize("fail_at", [1, 2])  # the step's capture, the cycle-end forward's
def test_a_failed_capture_goes_on_eagerly(bpe_tokenizer, monkeypatch, fail_at):
    eager, eager_weight, _ = _edit(bpe_tokenizer, cuda_graphs=False)
    recorder, state = Recorder(fail_at), {}
    monkeypatch.setitem(graphs.CAPTURES, "cpu", recorder)
    with pytest.warns(UserWarning, match="capture failed"):
        record, weight, _ = _edit(bpe_tokenizer, policy_state=state)
    assert state["capturable"] is False  # the next edits of this model do not try again
    assert recorder.captures == fail_at and not record.graphed
    assert record.losses == eager.losses and torch.equal(weight, eager_weight)


def test_graphs_apply_only_where_the_step_is_fixed(bpe_tokenizer, monkeypatch):
    """Not on a device without a capture (CPU by default), nor where a step changes shape or reads the host."""
    from kdpo_lightning.replay import EditBatch

    model = tiny_model("llama").cpu()  # also where the tests' default device is a GPU
    ids = torch.tensor([encode(bpe_tokenizer, PROMPT, TARGET).input_ids], device="cpu")
    with Policy(model) as policy:
        adam = torch.optim.Adam(policy.params.values())
        one, two = EditBatch.of(ids, 5), EditBatch.of(ids, 5, [(ids, 4)])
        assert not graphs.graphs_apply(EditConfig(), one, policy, adam)  # CPU
        monkeypatch.setitem(graphs.CAPTURES, "cpu", Recorder())
        assert graphs.graphs_apply(EditConfig(), one, policy, adam)
        assert graphs.graphs_apply(EditConfig(method="ftm"), one, policy, adam)
        assert not graphs.graphs_apply(EditConfig(cuda_graphs=False), one, policy, adam)
        assert not graphs.graphs_apply(EditConfig(method="dpo"), one, policy, adam)
        assert not graphs.graphs_apply(EditConfig(replay=1), two, policy, adam)
        assert not graphs.graphs_apply(EditConfig(), one, policy, torch.optim.SGD(policy.params.values(), lr=1.0))
        policy.constraints = [NormBound({}, 0.1)]
        assert not graphs.graphs_apply(EditConfig(), one, policy, adam)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_the_eager_loop(bpe_tokenizer, monkeypatch, dtype):
    """Real graphs: captured twice, replayed for every later step, the losses those of the eager loop. In bf16
    the two paths' kernels round differently, and Adam turns a gradient near 0 into a whole step either way, so
    there the weight change is compared as a whole."""
    counts = []
    monkeypatch.setitem(graphs.CAPTURES, "cuda", lambda fn, pool=None: (counts.append(1), graphs.cuda_capture(fn, pool))[1])
    eager, eager_weight, _ = _edit(bpe_tokenizer, dtype, "cuda", cuda_graphs=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns and goes on eagerly: here it must not
        replayed, weight, start = _edit(bpe_tokenizer, dtype, "cuda")
    assert len(counts) == 2 and replayed.graphed and not eager.graphed and replayed.steps == eager.steps == 12
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(torch.tensor(replayed.losses), torch.tensor(eager.losses), atol=tolerance, rtol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(weight, eager_weight, atol=tolerance, rtol=0)
    else:
        change, eager_change = weight - start, eager_weight - start
        assert (change - eager_change).abs().mean() <= 0.25 * eager_change.abs().mean()
