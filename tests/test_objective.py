"""The objectives against hand computations on small tensors."""
import math
import subprocess
import sys

import pytest
import torch

from kdpo_lightning import objective


def _rows(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


# Two target positions over a 3-token vocabulary; every row sums to 1.
POL = _rows([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
REF = _rows([[0.4, 0.4, 0.2], [0.2, 0.5, 0.3]])
Y_W = torch.tensor([0, 1])


def test_token_logps_and_argmax():
    assert torch.allclose(objective.token_logps(POL, Y_W), torch.tensor([math.log(0.5), math.log(0.6)], dtype=torch.float64))
    assert objective.teacher_forced_argmax(POL).tolist() == [0, 1]
    assert objective.teacher_forced_argmax(REF).tolist() in ([0, 1], [1, 1])


@pytest.mark.parametrize("mask", [True, False])
def test_kdpo_loss_by_hand(mask):
    y_l = torch.tensor([1, 1])  # second token equals y_w: it cancels whether masked or not
    beta = 0.1
    # policy minus reference, per sequence, summed over positions (position 2 cancels).
    margin = (math.log(0.5) - math.log(0.4)) - (math.log(0.3) - math.log(0.4))
    expected = -math.log(1 / (1 + math.exp(-beta * margin)))
    got = objective.kdpo_loss(POL, REF, Y_W, y_l, beta, mask_where_equal=mask)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_kdpo_loss_is_log2_at_reference():
    assert objective.kdpo_loss(POL, POL, Y_W, torch.tensor([2, 0]), 0.1).item() == pytest.approx(math.log(2))


def test_vanilla_dpo_mask_matters_in_separate_contexts():
    rows_l = _rows([[0.2, 0.3, 0.5], [0.3, 0.3, 0.4]])
    ref_l = _rows([[0.2, 0.2, 0.6], [0.1, 0.7, 0.2]])
    y_l = torch.tensor([2, 1])
    beta = 0.5
    w = (math.log(0.5) - math.log(0.4)) + (math.log(0.6) - math.log(0.5))
    l_all = (math.log(0.5) - math.log(0.6)) + (math.log(0.3) - math.log(0.7))
    l_masked = math.log(0.5) - math.log(0.6)  # position 2 (y_w == y_l) dropped from both sums
    w_masked = math.log(0.5) - math.log(0.4)
    loss = lambda m: -math.log(1 / (1 + math.exp(-beta * m)))  # noqa: E731
    unmasked = objective.vanilla_dpo_loss(POL, rows_l, REF, ref_l, Y_W, y_l, beta, mask_where_equal=False)
    masked = objective.vanilla_dpo_loss(POL, rows_l, REF, ref_l, Y_W, y_l, beta, mask_where_equal=True)
    assert unmasked.item() == pytest.approx(loss(w - l_all), rel=1e-12)
    assert masked.item() == pytest.approx(loss(w_masked - l_masked), rel=1e-12)


def test_dpo_loss_rewards():
    losses, chosen, rejected = objective.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]),
                                                  torch.tensor([-1.5]), torch.tensor([-1.5]), beta=2.0)
    assert chosen.item() == pytest.approx(1.0) and rejected.item() == pytest.approx(-1.0)
    assert losses.item() == pytest.approx(math.log1p(math.exp(-2.0)))


def test_ftm_loss_is_mean_cross_entropy():
    expected = -(math.log(0.5) + math.log(0.6)) / 2
    assert objective.ftm_loss(POL, Y_W).item() == pytest.approx(expected)
    logits = torch.randn(4, 7, dtype=torch.float64)
    labels = torch.tensor([1, 6, 0, 3])
    assert objective.ftm_loss(logits.log_softmax(-1), labels).item() == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item())


def test_objective_imports_no_lightning():
    code = "import sys, kdpo_lightning.objective; print(any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
