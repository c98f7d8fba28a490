"""One edit, as in the paper's Algorithm 1: cycles of (regenerate y_l, stop if y_l == y_w, s steps).

The forward that regenerates y_l at the start of a cycle sees the same weights and input as the
first optimizer step of that cycle, so its rows serve both: one forward, not two. The edit's first
forward also gives the reference its rows on c+y_w.

Replay (`EditConfig.replay`): earlier edits go into the same forward (`replay.EditBatch`); each cycle
regenerates their y_l too, the step's loss adds the loss of each one that does not hold, and the edit
stops once it and all of them hold. Their reference is the model at this edit's start.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from . import objective
from .graphs import GraphedSteps, graphs_apply
from .policy import Policy
from .replay import EditBatch, Replay

METHODS = ("kdpo", "dpo", "ftm", "memit", "alphaedit")
GRADIENT_METHODS = ("kdpo", "dpo", "ftm")
"""Methods `run_edit` runs; MEMIT and AlphaEdit are closed-form (`locate.py`)."""
REPLAY_METHODS = ("kdpo", "ftm")
"""Methods that rehearse earlier edits: their loss reads rows on c+y_w, which one batched forward gives."""


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
    train_stop: bool = False
    """Train on y_w followed by the stop token (EOS), so the model learns to end its answer there (LocFT-BF);
    False is the paper's recipe."""
    chat_template: bool = False
    """Edit the prompt as one user turn of the model's chat template, y_w as the start of the assistant's answer,
    so that the edit reaches answers generated through the template; False is the paper's bare `c + ' ' + y_w`.
    kdpo, dpo and ftm; teacher-forced metrics keep the bare prompt (EasyEdit's)."""
    replay: int = 0
    """Earlier edits each sequential edit rehearses (sampled; the loss of each that does not hold is added
    to the step's), so they are kept rather than overwritten; 0 is the paper's recipe. kdpo and ftm."""
    replay_pool: int = 0
    """More than `replay`: draw this many earlier edits and rehearse `replay` of them, those the model has
    forgotten (teacher-forced argmax != y_w, one batched forward) first; 0 draws `replay` at random."""
    cuda_graphs: bool = True
    """On a GPU, capture an edit's step once and replay it (`graphs.py`): the same arithmetic without the
    launch overhead. kdpo and ftm without replays or constraints; elsewhere, and on CPU, steps run eagerly."""

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
        if self.replay < 0:
            raise ValueError(f"replay must be 0 or more, got {self.replay}")
        if self.replay_pool and not self.replay_pool > self.replay > 0:
            raise ValueError(f"replay_pool chooses `replay` earlier edits among more: it must exceed replay (> 0), got "
                             f"replay_pool {self.replay_pool} and replay {self.replay}")
        if self.replay and self.method not in REPLAY_METHODS:
            raise ValueError(f"replay works with methods {REPLAY_METHODS}, not {self.method!r}")
        if self.chat_template and self.method not in GRADIENT_METHODS:
            raise ValueError(f"chat_template works with methods {GRADIENT_METHODS}, not {self.method!r} (which edits "
                             "the request's bare prompt)")


@dataclass
class EditRecord:
    """What one edit did: cycles and steps used, losses, whether y_w became the greedy output."""

    cycles: int = 0
    steps: int = 0
    success: bool = False
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    replays: int = 0
    """Earlier edits rehearsed alongside this one."""
    replays_kept: int = 0
    """Of those, how many the model still gives (teacher-forced argmax) when this edit ends."""
    graphed: bool = False
    """Its steps after the first were replayed as CUDA graphs (`cuda_graphs`)."""
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


def make_optimizer(params: Iterable[Tensor], lr: float) -> torch.optim.Adam:
    """A fresh Adam for an edit; on CPU its fused kernel, one pass over the tensor: 3.5 ms a step instead of
    16.6 on a 768x2048 tensor with one thread, the same update up to float rounding. Elsewhere the default
    (the CUDA graph path captures that one)."""
    params = list(params)
    return torch.optim.Adam(params, lr=lr, fused=True if all(p.device.type == "cpu" for p in params) else None)


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
    replays: Sequence[Replay] = (),
) -> EditRecord:
    """Edit the policy so that greedy decoding after c gives y_w. `input_ids` (1, T) is c+y_w.

    `reference` may be None for FT-M. `backward` lets Lightning pass `manual_backward`. `replays` are
    earlier edits (c+y_w (1, T_j), target start) to rehearse (kdpo, ftm). The edit runs between
    `policy.begin_edit(its sequences)` and `policy.end_edit()`, the latter also on an error.
    Raises NonFiniteError (weights left as they are: the caller rolls back).
    """
    if config.method not in GRADIENT_METHODS:
        raise ValueError(f"{config.method} writes its edit in closed form: use KDPOEditor, which runs it (locate.py)")
    if replays and config.method not in REPLAY_METHODS:
        raise ValueError(f"replay works with methods {REPLAY_METHODS}, not {config.method!r}")
    batch = EditBatch.of(input_ids, target_start, replays)
    start_time = time.perf_counter()
    policy.begin_edit([input_ids, *(ids for ids, _ in replays)])
    try:
        record = _cycles(policy, reference, batch, config, optimizer, backward)
    finally:
        policy.end_edit()
    record.seconds = time.perf_counter() - start_time
    return record


def _cycles(policy: Policy, reference, batch: EditBatch, config: EditConfig,
            optimizer: torch.optim.Optimizer, backward: Callable[[Tensor], None]) -> EditRecord:
    """The cycles of `run_edit`, inside the policy's edit. Row 0 of `batch` is the edit, the others replays."""
    ids, n, padding = batch.input_ids, batch.n, batch.padding
    rows = policy.rows(ids, n, **padding)  # at edit start these are also the reference's rows
    if reference is not None:
        reference.begin_edit(policy, ids, n, rows)
    record, losses = EditRecord(replays=len(batch) - 1), []
    graphs = None
    if graphs_apply(config, batch, policy, optimizer):  # every step after the edit's first is replayed
        graphs = GraphedSteps(lambda y_l: _step(config, reference, policy.rows(ids, n), ids, batch, y_l, [0],
                                                optimizer, backward, policy),
                              lambda: policy.rows(ids, n), optimizer)
    for _ in range(config.n_cycles):
        y_l = objective.teacher_forced_argmax(rows).detach()
        held = batch.held(y_l)
        if config.early_stop and all(held):
            break
        record.cycles += 1
        rehearsed = [0] + [row for row in range(1, len(batch)) if not held[row]]  # the edit, replays not kept
        inputs = ids
        if config.method == "dpo":  # vanilla DPO: [c+y_w; c+y_l], one batch of two
            y_l = greedy_continuation(policy.model, ids[:, :-n], n)
            inputs = torch.cat([ids, torch.cat([ids[:, :-n], y_l], dim=1)])
            rows = torch.cat([rows, policy.rows(inputs[1:], n)])
        for step in range(config.n_steps):
            if graphs is not None and losses:
                rows = None  # no autograd graph of an eager step may outlive it into a capture
                loss = graphs.step(y_l)
            else:
                if step > 0:
                    rows = policy.rows(inputs, n, **padding)
                loss = _step(config, reference, rows, inputs, batch, y_l, rehearsed, optimizer, backward, policy)
            losses.append(loss)
            record.steps += 1
        _check_finite(losses, policy)
        rows = graphs.rows() if graphs is not None else policy.rows(ids, n, **padding)
    held = batch.held(objective.teacher_forced_argmax(rows))
    record.success, record.replays_kept = held[0], sum(held[1:])
    record.graphed = graphs is not None and graphs.graphed
    if graphs is not None and graphs.eager:
        policy.capturable = False  # this model's step cannot be captured: later edits do not try again
    record.losses = [float(x) for x in losses]
    return record


def _step(config: EditConfig, reference, rows: Tensor, inputs: Tensor, batch: EditBatch, y_l: Tensor,
          rehearsed: list[int], optimizer: torch.optim.Optimizer, backward: Callable[[Tensor], None],
          policy: Policy) -> Tensor:
    """One optimizer step on the loss of `rows` (the policy's, on `inputs`); returns the loss, detached."""
    loss = _loss(config, reference, rows, inputs, batch, y_l, rehearsed)
    optimizer.zero_grad(set_to_none=True)
    backward(loss)
    optimizer.step()
    policy.step_done()
    return loss.detach()


def _loss(config: EditConfig, reference, rows: Tensor, inputs: Tensor, batch: EditBatch, y_l: Tensor,
          rehearsed: list[int]) -> Tensor:
    """The method's loss for this step: the sum of the losses of the `rehearsed` rows of `batch`.
    `rows` (B, n, V) are the policy's rows on `inputs`: the batch, or for vanilla DPO c+y_w and c+y_l."""
    if config.method == "dpo":
        y_w, ref_rows = batch.target(0), reference.rows(inputs, batch.n)
        loss = objective.vanilla_dpo_loss(rows[0], rows[1], ref_rows[0], ref_rows[1], y_w, y_l[0], config.beta,
                                          config.mask_where_equal)
        return objective.nll_anchored(loss, rows[0], y_w, config.nll_alpha)
    ref_rows = reference.rows(inputs, batch.n) if config.method == "kdpo" else None
    return torch.stack([_edit_loss(config, batch, row, rows, ref_rows, y_l) for row in rehearsed]).sum()


def _edit_loss(config: EditConfig, batch: EditBatch, row: int, rows: Tensor, ref_rows: Tensor | None,
               y_l: Tensor) -> Tensor:
    """One row's loss, on its own target positions: FT-M's cross-entropy, or KDPO with its NLL anchor."""
    own, y_w = batch.own(rows, row), batch.target(row)
    if config.method == "ftm":
        return objective.ftm_loss(own, y_w)
    loss = objective.kdpo_loss(own, batch.own(ref_rows, row), y_w, batch.own(y_l, row), config.beta,
                               config.mask_where_equal)
    return objective.nll_anchored(loss, own, y_w, config.nll_alpha)


def _check_finite(losses: list[Tensor], policy: Policy) -> None:
    """One device sync per cycle: a NaN loss or weight ends the edit."""
    if not torch.isfinite(torch.stack(losses)).all():
        raise NonFiniteError("the loss became non-finite")
    if not all(torch.isfinite(p).all() for p in policy.params.values()):
        raise NonFiniteError("a trained tensor became non-finite")
