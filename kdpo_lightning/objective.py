"""The editing objectives as pure tensor functions (no Lightning, no modules, no state).

Shapes: `T` target tokens, `V` vocabulary. A *row* tensor `(..., T, V)` holds the log-softmax
over the vocabulary at the positions that predict the target tokens, so row `t` scores token
`t` of y_w (or y_l) given everything before it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logps(rows: Tensor, labels: Tensor) -> Tensor:
    """log p(labels[t] | context) for every position: rows (..., T, V), labels (..., T) -> (..., T)."""
    return rows.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def teacher_forced_argmax(rows: Tensor) -> Tensor:
    """y_l of KDPO: the model's greedy token at each target position, fed y_w before it. (..., T)."""
    return rows.argmax(-1)


def difference_mask(y_w: Tensor, y_l: Tensor) -> Tensor:
    """1.0 where y_w and y_l differ: equal tokens cancel in the DPO gradient (paper, Fig. 2)."""
    return (y_w != y_l).to(torch.float32)


def dpo_loss(
    chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO on summed sequence log-probs, all (B,) or (): returns (losses, chosen_rewards, rejected_rewards).

    loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))]).
    """
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards.detach(), rejected_rewards.detach()


def kdpo_loss(
    rows: Tensor, ref_rows: Tensor, y_w: Tensor, y_l: Tensor, beta: float, mask_where_equal: bool = True
) -> Tensor:
    """KDPO: y_w and the teacher-forced y_l are both scored in the context c+y_w, so one set of
    rows (T, V) from the policy and one from the reference serve both sequences."""
    return vanilla_dpo_loss(rows, rows, ref_rows, ref_rows, y_w, y_l, beta, mask_where_equal)


def vanilla_dpo_loss(
    rows_w: Tensor,
    rows_l: Tensor,
    ref_rows_w: Tensor,
    ref_rows_l: Tensor,
    y_w: Tensor,
    y_l: Tensor,
    beta: float,
    mask_where_equal: bool = True,
) -> Tensor:
    """Vanilla DPO (the paper's ablation): y_l was generated free-running from c and is scored in
    its own context c+y_l, so each sequence has its own rows (T, V) from policy and reference."""
    mask = difference_mask(y_w, y_l) if mask_where_equal else torch.ones_like(y_w, dtype=torch.float32)

    def summed(rows: Tensor, y: Tensor) -> Tensor:
        return (token_logps(rows, y) * mask).sum()

    loss, _, _ = dpo_loss(summed(rows_w, y_w), summed(rows_l, y_l), summed(ref_rows_w, y_w), summed(ref_rows_l, y_l), beta)
    return loss


def ftm_loss(rows: Tensor, y_w: Tensor) -> Tensor:
    """FT-M: cross-entropy on the y_w tokens only (the prompt is masked out). Rows (T, V), y_w (T,)."""
    return -token_logps(rows, y_w).mean()


def nll_anchored(loss: Tensor, rows: Tensor, y_w: Tensor, alpha: float) -> Tensor:
    """DPO + alpha * NLL(y_w) (RPO; EasyEdit's DPO): keeps the chosen answer's likelihood rising,
    not only its margin over y_l. Rows (T, V), y_w (T,); alpha 0 returns `loss` unchanged."""
    return loss + alpha * ftm_loss(rows, y_w) if alpha else loss


def null_space_projector(covariance: Tensor, threshold: float) -> Tensor:
    """P = U U^T over the eigenvectors of the keys' covariance (I, I) whose eigenvalues are below
    `threshold` x the largest: an update dW P leaves (dW P) k ~ 0 for every preserved key k (AlphaEdit).
    A zero covariance has no keys to preserve: P = I."""
    if not covariance.any():
        return torch.eye(covariance.shape[0], dtype=covariance.dtype, device=covariance.device)
    values, vectors = torch.linalg.eigh(covariance.double())
    null = vectors[:, values < threshold * values.max()]
    return (null @ null.T).to(covariance.dtype)


def span_basis(keys: Tensor, rtol: float = 1e-6) -> Tensor:
    """An orthonormal basis (I, r) of the span of the rows of `keys` (N, I): the right singular vectors whose
    singular value is above rtol x the largest (float64 SVD, returned in fp32). No keys: an empty (I, 0) basis."""
    if not keys.any():
        return keys.new_zeros(keys.shape[-1], 0, dtype=torch.float32)
    _, values, vectors = torch.linalg.svd(keys.double(), full_matrices=False)
    return vectors[values > rtol * values.max()].T.float()


def bound_change(weight: Tensor, original: Tensor, max_ratio: float) -> Tensor:
    """`weight` with its change from `original` scaled down to at most max_ratio * ||original||_F
    (Frobenius); unchanged when already within the bound."""
    change = weight - original
    limit = max_ratio * original.norm()
    norm = change.norm()
    return original + change * (limit / norm) if norm > limit else weight
