"""One edit, as in the paper's Algorithm 1: cycles of (regenerate y_l, stop if y_l == y_w, s steps).

The forward that regenerates y_l at the start of a cycle sees the same weights and input as the
first optimizer step of that cycle, so its rows serve both: one forward, not two.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from . import objective
from .policy import Policy

METHODS = ("kdpo", "dpo", "ftm")


@dataclass
class EditConfig:
    """How one edit is made (paper defaults: 10 cycles of 8 Adam steps at lr 1e-4, beta 0.1)."""

    method: str = "kdpo"
    """kdpo (teacher-forced y_l), dpo (vanilla: y_l generated free-running) or ftm (masked cross-entropy)."""
    n_cycles: int = 10
    """Most cycles per edit; each regenerates y_l and stops the edit once y_l == y_w."""
    n_steps: int = 8
    """Optimizer steps per cycle."""
    lr: float = 1e-4
    """Adam learning rate (a fresh Adam per edit)."""
    beta: float = 0.1
    """DPO temperature."""
    mask_where_equal: bool = True
    """Drop the positions where y_w == y_l from the DPO sums (they cancel in the gradient)."""
    early_stop: bool = True
    """Stop once y_l == y_w; False runs every cycle (a fixed schedule, for benchmarks)."""
    nll_alpha: float = 0.0
    """Add alpha * NLL(y_w) to the DPO loss (RPO's anchor); 0 is the paper's objective."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        for name in ("n_cycles", "n_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "beta"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.nll_alpha < 0:
            raise ValueError(f"nll_alpha must be 0 or more, got {self.nll_alpha}")


@dataclass
class EditRecord:
    """What one edit did: cycles and steps used, losses, whether y_w became the greedy output."""

    cycles: int = 0
    steps: int = 0
    success: bool = False
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    failed: str | None = None
    """Why the edit was rolled back (e.g. a non-finite loss), or None."""

    @property
    def first_loss(self) -> float | None:
        return self.losses[0] if self.losses else None

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1] if self.losses else None

    def as_dict(self) -> dict:
        return {**asdict(self), "first_loss": self.first_loss, "last_loss": self.last_loss}


class NonFiniteError(FloatingPointError):
    """A loss or a trained tensor became NaN or infinite during an edit."""


@torch.no_grad()
def greedy_continuation(model: nn.Module, prompt_ids: Tensor, n_tokens: int) -> Tensor:
    """Free-running greedy decoding of `n_tokens` after the prompt: (1, P) -> (1, n_tokens).

    Full forwards without a KV cache: targets are a few tokens, and this keeps to the stable API."""
    ids = prompt_ids
    for _ in range(n_tokens):
        logits = model(input_ids=ids, logits_to_keep=1, use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt_ids.shape[1] :]


def run_edit(
    policy: Policy,
    reference,
    input_ids: Tensor,
    target_start: int,
    config: EditConfig,
    optimizer: torch.optim.Optimizer,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> EditRecord:
    """Edit the policy so that greedy decoding after c gives y_w. `input_ids` (1, T) is c+y_w.

    `reference` may be None for FT-M. `backward` lets Lightning pass `manual_backward`.
    Raises NonFiniteError (weights left as they are: the caller rolls back).
    """
    start_time = time.perf_counter()
    y_w = input_ids[0, target_start:]
    n = y_w.numel()
    policy.begin_edit()
    rows = policy.rows(input_ids, n)  # at edit start these are also the reference's rows
    if reference is not None:
        reference.begin_edit(policy, input_ids, n, rows)
    record, losses = EditRecord(), []
    for _ in range(config.n_cycles):
        y_l = objective.teacher_forced_argmax(rows[0]).detach()
        if config.early_stop and torch.equal(y_l, y_w):
            break
        record.cycles += 1
        inputs = input_ids  # vanilla DPO: [c+y_w; c+y_l], one batch of two
        if config.method == "dpo":
            y_l = greedy_continuation(policy.model, input_ids[:, :target_start], n)[0]
            inputs = torch.cat([input_ids, torch.cat([input_ids[:, :target_start], y_l[None]], dim=1)])
            rows = torch.cat([rows, policy.rows(inputs[1:], n)])
        for step in range(config.n_steps):
            if step > 0:
                rows = policy.rows(inputs, n)
            loss = _loss(config, reference, rows, inputs, y_w, y_l)
            optimizer.zero_grad(set_to_none=True)
            backward(loss)
            optimizer.step()
            policy.step_done()
            losses.append(loss.detach())
            record.steps += 1
        _check_finite(losses, policy)
        rows = policy.rows(input_ids, n)
    record.success = bool(torch.equal(objective.teacher_forced_argmax(rows[0]), y_w))
    record.losses = [float(x) for x in losses]
    record.seconds = time.perf_counter() - start_time
    return record


def _loss(config: EditConfig, reference, rows: Tensor, inputs: Tensor, y_w: Tensor, y_l: Tensor) -> Tensor:
    """The method's loss for this step. `rows` (B, n, V) are the policy's rows on `inputs`:
    c+y_w, and for vanilla DPO also c+y_l."""
    if config.method == "ftm":
        return objective.ftm_loss(rows[0], y_w)
    ref_rows = reference.rows(inputs, y_w.numel())
    if config.method == "kdpo":
        loss = objective.kdpo_loss(rows[0], ref_rows[0], y_w, y_l, config.beta, config.mask_where_equal)
    else:
        loss = objective.vanilla_dpo_loss(rows[0], rows[1], ref_rows[0], ref_rows[1], y_w, y_l, config.beta,
                                          config.mask_where_equal)
    return objective.nll_anchored(loss, rows[0], y_w, config.nll_alpha)


def _check_finite(losses: list[Tensor], policy: Policy) -> None:
    """One device sync per cycle: a NaN loss or weight ends the edit."""
    if not torch.isfinite(torch.stack(losses)).all():
        raise NonFiniteError("the loss became non-finite")
    if not all(torch.isfinite(p).all() for p in policy.params.values()):
        raise NonFiniteError("a trained tensor became non-finite")
