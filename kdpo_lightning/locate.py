"""Closed-form locate-then-edit: MEMIT (Meng et al. 2023) and AlphaEdit (Fang et al. 2025).

An edit (one request or a batch) follows the official AlphaEdit code (github.com/jianghoucheng/AlphaEdit,
built on MEMIT's), over a few consecutive layers' MLP output projections W (found as in `policy.py`):
1. Target value z, per request: a vector added to the last edited layer's output at the subject's last
   token is trained with Adam until the model says y_w after the prompt in every context template (the
   layers up to that one are run once and replayed: nothing below the delta changes). `v_objective: kdpo`
   trains it on KDPO's loss instead, until y_w is the teacher-forced argmax in every template.
2. Keys k: each edited projection's input at the subject's last token, averaged over context templates.
3. Layer by layer, from the lowest: the residual R = z - (the last edited layer's output now), divided by
   the number of layers left, is written into W in closed form; the next layer's keys are read from the
   model with the layers below it already changed.

MEMIT      dW = R K^T (lambda C + K K^T)^-1               C: the preserved keys' second moment
AlphaEdit  dW = R K^T P (K_p K_p^T P + K K^T P + l2 I)^-1  P: projector onto C's null space,
                                                           K_p: the keys of earlier edits
AlphaEdit's dW satisfies dW = dW P, so dW k0 ~ 0 for every preserved key k0: their outputs stay.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .constraints import projection_inputs, projection_module
from .data import EditRequest, encode
from .loop import EditRecord
from .objective import kdpo_loss, teacher_forced_argmax
from .policy import (
    find_layers, layer_output, output_projections, replaced_forwards, split_hidden, target_rows,
)

LOCATE_METHODS = ("memit", "alphaedit")
V_OBJECTIVES = ("nll", "kdpo")
TEMPLATE_STARTS = ("The", "Therefore", "Because", "I", "You")
"""Where the generated context templates start (official `get_context_templates`)."""


@dataclass(frozen=True)
class LocateConfig:
    """MEMIT/AlphaEdit settings; defaults are the official LLaMA3-8B ones (hparams/AlphaEdit/Llama3-8B.json,
    hparams/MEMIT/Llama3-8B.json: the same values where both have them)."""

    layers: list[int] | None = None
    """Edited layers, ascending. None: the official [4, 5, 6, 7, 8] of 32 scaled to the depth (`default_layers`)."""
    v_lr: float = 0.1
    """Adam learning rate of the target-value delta (v_lr)."""
    v_num_grad_steps: int = 25
    """Most target-value iterations; the last one only scores, so at most 24 Adam steps (v_num_grad_steps)."""
    v_weight_decay: float = 0.5
    """Weight of ||delta|| / ||h||^2 in the target-value loss, h the layer's output (v_weight_decay)."""
    clamp_norm_factor: float = 0.75
    """||delta|| is kept within this fraction of ||h|| (clamp_norm_factor)."""
    kl_factor: float = 0.0625
    """Weight of KL(now || before) of the next-token distribution after "{subject} is a" (kl_factor)."""
    v_loss_layer: int = -1
    """Layer whose output the target loss reads through the final norm and head; negative counts from the end.
    -1: the last layer, as the official 31 of LLaMA3-8B's 32 (v_loss_layer)."""
    v_stop_loss: float = 5e-2
    """The target-value optimization stops once its loss is below this (hard-coded in AlphaEdit/compute_z.py)."""
    v_objective: str = "nll"
    """What z is trained on: nll (the official: y_w's mean NLL over the templates) or kdpo (KDPO's loss against
    the model before the edit, averaged over the templates, y_l the teacher-forced argmax regenerated every
    `v_cycle_steps` steps; z is found once y_l == y_w in every template, or by `v_margin`; `v_stop_loss` is
    not used)."""
    v_beta: float = 0.1
    """KDPO's beta for `v_objective: kdpo`."""
    v_cycle_steps: int = 8
    """Adam steps between y_l regenerations for `v_objective: kdpo` (KDPO's steps per cycle)."""
    v_margin: float = 0.0
    """For `v_objective: kdpo`, the lead z must give y_w (`rival_and_found`): 0, KDPO's stop (y_w is the argmax);
    above 0, y_l is the strongest other token and z is found once log p(y_w) leads it by this everywhere,
    which leaves the closed-form write (that reaches z only in part) room to land the edit."""
    mom2_update_weight: float = 15000.0
    """MEMIT's lambda, the weight of the preserved keys' second moment C (mom2_update_weight)."""
    nullspace_threshold: float = 2e-2
    """AlphaEdit: P spans C's eigenvectors with eigenvalue below this, absolute (nullspace_threshold)."""
    l2: float = 10.0
    """AlphaEdit's Tikhonov term l2 I (L2)."""
    n_context_templates: int = 5
    """Generated context templates besides the bare prompt (official: 5, one per TEMPLATE_STARTS)."""
    context_template_length: int = 10
    """Tokens of each generated template, its start word included (official: max_out_len 10)."""
    seed: int = 0
    """Seed of the templates' top-5 sampling (the official code samples them unseeded)."""

    def __post_init__(self) -> None:
        if self.layers is not None and (not self.layers or min(self.layers) < 0
                                        or list(self.layers) != sorted(set(self.layers))):
            raise ValueError(f"layers must be distinct layer indices in ascending order, got {self.layers}")
        for name in ("v_lr", "clamp_norm_factor", "mom2_update_weight", "nullspace_threshold", "l2"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("v_weight_decay", "kl_factor", "v_stop_loss", "n_context_templates"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.v_objective not in V_OBJECTIVES:
            raise ValueError(f"v_objective must be one of {V_OBJECTIVES}, got {self.v_objective!r}")
        if not self.v_beta > 0 or self.v_cycle_steps < 1 or self.v_margin < 0:
            raise ValueError(f"v_beta must be positive, v_cycle_steps at least 1 and v_margin 0 or more, got "
                             f"{self.v_beta}, {self.v_cycle_steps}, {self.v_margin}")
        if self.v_num_grad_steps < 1:
            raise ValueError(f"v_num_grad_steps must be at least 1, got {self.v_num_grad_steps}")
        if self.context_template_length < 2:
            raise ValueError(f"context_template_length must be at least 2, got {self.context_template_length}")


def default_layers(n_layers: int) -> list[int]:
    """The layers at the official LLaMA3-8B layers' relative depth: l with 4/32 <= l/n_layers < 9/32
    (32 -> 4..8, 30 -> 4..8, 24 -> 3..6, 4 -> [1]); the one layer at depth 4/32 if that range holds none."""
    layers = [l for l in range(n_layers) if 4 * n_layers <= 32 * l < 9 * n_layers]
    return layers or [min(-(-4 * n_layers // 32), n_layers - 1)]


def edited_weight_names(model: nn.Module, layers: Sequence[int]) -> list[str]:
    """Full parameter names of the MLP output projection of each of `layers` (one Linear/Conv1D each)."""
    list_name, blocks = find_layers(model)
    hidden = model.config.get_text_config().hidden_size
    names = []
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} is out of range for a model with {len(blocks)} layers")
        found = output_projections(blocks[layer], hidden)
        if len(found) != 1:
            raise ValueError(f"MEMIT/AlphaEdit need one MLP output projection in {list_name}.{layer}, found {found}")
        names.append(f"{list_name}.{layer}.{found[0]}")
        projection_module(model, names[-1])  # a Linear/Conv1D weight, or a clear error
    return names


def memit_update(keys: Tensor, residuals: Tensor, covariance: Tensor, weight: float) -> Tensor:
    """MEMIT's dW = R K^T (weight C + K K^T)^-1 (float64): keys K (in, n), residuals R (out, n),
    covariance C (in, in) -> (out, in)."""
    K, R = keys.double(), residuals.double()
    return torch.linalg.solve(weight * covariance.double() + K @ K.T, K @ R.T).T


def null_space(covariance: Tensor, threshold: float) -> Tensor:
    """AlphaEdit's P = U U^T over the eigenvectors U of C (in, in) whose eigenvalue is below `threshold`
    (absolute, as the official `get_project`); float64."""
    values, vectors = torch.linalg.eigh(covariance.double())
    null = vectors[:, values < threshold]
    return null @ null.T


def alphaedit_update(keys: Tensor, residuals: Tensor, projector: Tensor, edited: Tensor, l2: float) -> Tensor:
    """AlphaEdit's dW = R K^T P (K_p K_p^T P + K K^T P + l2 I)^-1 (float64): keys K (in, n), residuals
    R (out, n), projector P (in, in), edited = K_p K_p^T (in, in) -> (out, in)."""
    K, R, P = keys.double(), residuals.double(), projector.double()
    system = P @ (edited.double() + K @ K.T) + l2 * torch.eye(len(P), dtype=P.dtype, device=P.device)
    return torch.linalg.solve(system, P @ K @ R.T).T  # the transpose of dW's equation, as P and K K^T are symmetric


def kdpo_rows_loss(rows: Tensor, ref_rows: Tensor, y_w: Tensor, y_l: Tensor, n: int, beta: float) -> Tensor:
    """The mean over templates of KDPO's loss: rows and ref_rows (templates x n, V), y_w and y_l
    (templates x n,), each template's n consecutive rows scoring y_w's n tokens."""
    losses = [kdpo_loss(r, q, w, l, beta) for r, q, w, l in zip(rows.split(n), ref_rows.split(n), y_w.split(n),
                                                                 y_l.split(n))]
    return torch.stack(losses).mean()


def rival_and_found(rows: Tensor, y_w: Tensor, margin: float) -> tuple[Tensor, bool]:
    """y_l for z's KDPO loss and whether z is found, from log-prob rows (N, V) over y_w (N,). Margin 0: KDPO's
    y_l, the teacher-forced argmax, found once it is y_w everywhere. Above 0: the strongest token other than
    y_w, found once y_w's log-prob leads it by `margin` everywhere."""
    if margin == 0:
        y_l = teacher_forced_argmax(rows)
        return y_l, bool((y_l == y_w).all())
    rivals = rows.scatter(-1, y_w[:, None], float("-inf"))
    y_l = rivals.argmax(-1)
    lead = rows.gather(-1, y_w[:, None]) - rivals.gather(-1, y_l[:, None])
    return y_l, bool((lead >= margin).all())


def spread_residual(residual: Tensor, index: int, n_layers: int) -> Tensor:
    """The share of the residual that layer `index` (0-based among `n_layers` edited layers) writes:
    an equal part of what is left for it and the layers above it."""
    return residual / (n_layers - index)


@torch.no_grad()
def context_templates(model: nn.Module, tokenizer, n: int, length: int, seed: int) -> list[str]:
    """Prefixes an edit is averaged over: "" (the bare prompt), then `n` texts of `length` tokens the model
    writes from TEMPLATE_STARTS by top-5 sampling (official `get_context_templates`): decoded without special
    tokens, blank lines and braces blanked, each followed by ". "."""
    generator = torch.Generator().manual_seed(seed)
    device = model.get_input_embeddings().weight.device
    prefixes = [""]
    for i in range(n):
        ids = list(tokenizer(TEMPLATE_STARTS[i % len(TEMPLATE_STARTS)])["input_ids"])
        while len(ids) < length:
            logits = model(input_ids=torch.tensor([ids], device=device), logits_to_keep=1, use_cache=False).logits
            top = logits[0, -1].float().topk(5)
            ids.append(int(top.indices[torch.multinomial(top.values.softmax(-1).cpu(), 1, generator=generator)]))
        text = tokenizer.decode(ids, skip_special_tokens=True).replace("\n\n", " ").replace("{", " ").replace("}", " ")
        prefixes.append(text + ". ")
    return prefixes


@dataclass(frozen=True)
class _Fact:
    """A request split around the subject's first occurrence in the prompt, and its c+y_w ids (`data.encode`)."""

    before: str
    subject: str
    after: str
    input_ids: tuple[int, ...]
    target_start: int

    @property
    def prompt(self) -> str:
        return self.before + self.subject + self.after

    @property
    def y_w(self) -> tuple[int, ...]:
        return self.input_ids[self.target_start :]


def _fact(tokenizer, request: EditRequest) -> _Fact:
    at = request.prompt.find(request.subject) if request.subject else -1
    if at < 0:
        raise ValueError(f"MEMIT/AlphaEdit read keys at the subject's last token, but subject {request.subject!r} "
                         f"does not occur in prompt {request.prompt!r} ({request.source or 'request'})")
    end = at + len(request.subject)
    encoded = encode(tokenizer, request.prompt, request.target_new)
    return _Fact(request.prompt[:at], request.subject, request.prompt[end:], encoded.input_ids, encoded.target_start)


def _right_pad(sequences: list[list[int]], device: torch.device) -> Tensor:
    """(B, T) ids, padded on the right: a causal model's outputs at the real tokens do not see the padding."""
    width = max(map(len, sequences))
    return torch.tensor([s + [s[-1]] * (width - len(s)) for s in sequences], device=device)


@contextmanager
def _layers_pass_through(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Each of `layers` returns its input hidden states, so the head reads the layer below them."""

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [layer.register_forward_hook(identity, with_kwargs=True) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class LocateThenEdit:
    """Sequential MEMIT or AlphaEdit on a model: `edit` writes a batch of requests into the MLP output
    projections of `config.layers`; AlphaEdit also keeps the earlier edits' K_p K_p^T per layer."""

    def __init__(self, model: nn.Module, tokenizer, method: str, config: LocateConfig,
                 covariances: dict[str, Tensor]) -> None:
        """`covariances`: the preserved keys' second moment per edited weight name (`edited_weight_names`),
        e.g. from `constraints.cached_covariances`."""
        if method not in LOCATE_METHODS:
            raise ValueError(f"method must be one of {LOCATE_METHODS}, got {method!r}")
        self.model, self.tokenizer, self.method, self.config = model, tokenizer, method, config
        _, self.blocks = find_layers(model)
        n = len(self.blocks)
        self.layers = list(config.layers) if config.layers is not None else default_layers(n)
        self.names = edited_weight_names(model, self.layers)
        missing = [name for name in self.names if name not in covariances]
        if missing:
            raise ValueError(f"no covariance for {missing}; pass one per edited weight (edited_weight_names)")
        if not -n <= config.v_loss_layer < n:
            raise ValueError(f"v_loss_layer {config.v_loss_layer} is out of range for a model with {n} layers")
        self.loss_layer = max(config.v_loss_layer % n, self.layers[-1])
        self.device = model.get_input_embeddings().weight.device
        """Where input ids go; each edited weight's algebra runs on that weight's device."""
        self.modules = {name: projection_module(model, name) for name in self.names}
        self.weights = {name: module.weight for name, module in self.modules.items()}
        self.covariances = {name: covariances[name].to(self.weights[name].device, torch.float32) for name in self.names}
        self.projectors: dict[str, Tensor] = {}
        self.edited: dict[str, Tensor] = {}
        """AlphaEdit: sum of k k^T over the keys of every earlier edit, per weight (official `cache_c`)."""
        if method == "alphaedit":
            for name in self.names:
                self.projectors[name] = null_space(self.covariances[name], config.nullspace_threshold).float()
                self.edited[name] = torch.zeros_like(self.covariances[name])
        self.templates = context_templates(model, tokenizer, config.n_context_templates,
                                           config.context_template_length, config.seed)

    def state_dict(self) -> dict:
        """Plain data for a checkpoint: the method, the context templates and AlphaEdit's K_p K_p^T (CPU)."""
        return {"method": self.method, "templates": list(self.templates),
                "edited": {name: value.cpu() for name, value in self.edited.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.method or sorted(state["edited"]) != sorted(self.edited):
            raise ValueError(f"state of {state['method']} on {sorted(state['edited'])} does not fit {self.method} "
                             f"on {sorted(self.edited)}")
        self.templates = list(state["templates"])
        for name, value in state["edited"].items():
            self.edited[name] = value.to(self.edited[name].device, torch.float32)

    def edit(self, requests: Sequence[EditRequest]) -> list[EditRecord]:
        """Write the requests into the model together; one record per request. If a target value or an
        update is not finite, every weight is restored and each record says why (`failed`)."""
        if not requests:
            raise ValueError("edit needs at least one request")
        start = time.perf_counter()
        facts = [_fact(self.tokenizer, request) for request in requests]
        was_training = self.model.training
        self.model.eval()
        try:
            values = [self._target_value(fact) for fact in facts]
            failed = self._write(torch.stack([z for z, _ in values], dim=1), facts)
            records = [EditRecord(steps=len(losses) - 1, losses=losses, failed=failed) for _, losses in values]
            for record, fact in zip(records, facts):
                record.success = failed is None and self._succeeds(fact)
        finally:
            self.model.train(was_training)
        seconds = (time.perf_counter() - start) / len(records)
        for record in records:
            record.seconds = seconds
        return records

    def _write(self, z: Tensor, facts: list[_Fact]) -> str | None:
        """Step 3 for every edited layer, then AlphaEdit adds the keys to K_p K_p^T. Returns why it failed, or None."""
        if not torch.isfinite(z).all():
            return "a target value is not finite"
        saved: dict[str, Tensor] = {}
        n_layers = len(self.names)
        for index, name in enumerate(self.names):
            keys = self._keys(name, facts)
            residual = spread_residual(z - self._z_layer_output(facts), index, n_layers).to(keys.device)
            try:
                if self.method == "memit":
                    delta = memit_update(keys, residual, self.covariances[name], self.config.mom2_update_weight)
                else:
                    delta = alphaedit_update(keys, residual, self.projectors[name], self.edited[name], self.config.l2)
            except torch.linalg.LinAlgError as err:  # a singular system
                self._restore(saved)
                return f"the update of {name} failed: {err}"
            if not torch.isfinite(delta).all():
                self._restore(saved)
                return f"the update of {name} is not finite"
            weight = self.weights[name]
            saved[name] = weight.detach().clone()
            delta = delta.T if isinstance(self.modules[name], Conv1D) else delta  # Conv1D stores (in, out)
            with torch.no_grad():
                weight.copy_((weight.float() + delta.float()).to(weight.dtype))
        for name in self.edited:
            keys = self._keys(name, facts)
            self.edited[name] += keys @ keys.T
        return None

    def _restore(self, saved: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for name, value in saved.items():
                self.weights[name].copy_(value)

    def _ids(self, prefix: str, text: str) -> list[int]:
        return list(self.tokenizer(prefix + text)["input_ids"])

    def _lookup(self, prefix: str, fact: _Fact) -> int:
        """Index of the subject's last token after `prefix` (official `subject_last`)."""
        return len(self._ids(prefix, fact.before + fact.subject)) - 1

    def _target_value(self, fact: _Fact) -> tuple[Tensor, list[float]]:
        """Step 1: z (D,) fp32 for one request, and the loss at each iteration."""
        cfg, device = self.config, self.device
        rows = [self._ids(prefix, fact.prompt) + list(fact.y_w[:-1]) for prefix in self.templates]
        rows.append(self._ids("", fact.subject + " is a"))  # the KL prompt, read at the subject's last token
        lookups = [self._lookup(prefix, fact) for prefix in self.templates] + [len(self._ids("", fact.subject)) - 1]
        ids, n, n_rows = _right_pad(rows, device), len(fact.y_w), len(rows) - 1
        starts = [len(row) - n for row in rows[:-1]]  # row b's logit at starts[b] + t predicts y_w[t]
        positions = torch.tensor([s + t for s in starts for t in range(n)], device=device)
        batch = torch.arange(n_rows, device=device).repeat_interleave(n)
        keep = torch.unique(torch.cat([positions, torch.tensor(lookups[-1:], device=device)]))  # sorted
        columns, kl_column = torch.searchsorted(keep, positions), int(torch.searchsorted(keep, lookups[-1]))
        y_w = torch.tensor(fact.y_w, device=device).repeat(n_rows)
        z_device = self.weights[self.names[-1]].device
        at = (torch.arange(len(rows), device=z_device), torch.tensor(lookups, device=z_device))
        delta = torch.zeros(self.model.config.get_text_config().hidden_size, device=z_device, requires_grad=True)
        below = list(self.blocks)[: self.layers[-1] + 1]  # unchanged while z is found: run once, then replayed
        fixed = layer_output(self.model, below[-1], input_ids=ids)
        h = split_hidden(fixed)[0][0, lookups[0]].float()  # the layer's output at the bare prompt's subject token

        def add_delta(module, args, output):
            hidden, rest = split_hidden(output)
            hidden = hidden.index_put(at, hidden[at] + delta.to(hidden.dtype))
            return hidden if rest is None else (hidden, *rest)

        optimizer = torch.optim.Adam([delta], lr=cfg.v_lr)
        kl_before, losses, ref_rows, y_l = None, [], None, None
        handle = below[-1].register_forward_hook(add_delta)
        try:
            with (torch.enable_grad(), _layers_pass_through(list(self.blocks)[self.loss_layer + 1:]),
                  replaced_forwards({block: lambda *args, **kwargs: fixed for block in below})):
                for step in range(cfg.v_num_grad_steps):
                    # the head only at the positions read below: at every position it was a third of the time
                    logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
                    rows = logits[batch, columns].float().log_softmax(-1)  # (templates x n, V), template-major
                    held = False
                    if cfg.v_objective == "nll":  # the mean over templates of the mean over y_w's tokens
                        target = -rows.gather(-1, y_w[:, None]).sum() / (n * n_rows)
                    else:
                        ref_rows = rows.detach() if ref_rows is None else ref_rows  # delta = 0: the model before
                        if step % cfg.v_cycle_steps == 0:
                            y_l, held = rival_and_found(rows.detach(), y_w, cfg.v_margin)
                        target = kdpo_rows_loss(rows, ref_rows, y_w, y_l, n, cfg.v_beta)
                    kl_logps = logits[-1, kl_column].float().log_softmax(-1)
                    kl_before = kl_logps.detach() if kl_before is None else kl_before
                    kl = (kl_logps.exp() * (kl_logps - kl_before)).sum()  # KL(now || before)
                    loss = target + cfg.kl_factor * kl + cfg.v_weight_decay * delta.norm() / h.norm() ** 2
                    losses.append(loss.item())
                    stop = held if cfg.v_objective == "kdpo" else losses[-1] < cfg.v_stop_loss
                    if stop or step == cfg.v_num_grad_steps - 1:
                        break
                    delta.grad, = torch.autograd.grad(loss, [delta])  # no gradient into the model's weights
                    optimizer.step()
                    with torch.no_grad():
                        limit = cfg.clamp_norm_factor * h.norm()
                        if delta.norm() > limit:
                            delta.mul_(limit / delta.norm())
        finally:
            handle.remove()
        return h + delta.detach(), losses

    def _contexts(self, facts: list[_Fact]) -> tuple[list[list[int]], list[int]]:
        """Every (request, template) prompt's ids and its subject's last-token index, request-major."""
        ids, lookups = [], []
        for fact in facts:
            for prefix in self.templates:
                ids.append(self._ids(prefix, fact.prompt))
                lookups.append(self._lookup(prefix, fact))
        return ids, lookups

    @torch.no_grad()
    def _keys(self, name: str, facts: list[_Fact]) -> Tensor:
        """Step 2: keys (in, n) fp32 of projection `name`: per request the mean of the bare prompt's key
        and the generated templates' mean key (the official mean of the two groups' means)."""
        ids, lookups = self._contexts(facts)
        inputs = projection_inputs(self.model, {name: self.modules[name]}, _right_pad(ids, self.device))[name]
        k = inputs[torch.arange(len(ids), device=inputs.device), torch.tensor(lookups, device=inputs.device)].float()
        k = k.view(len(facts), len(self.templates), -1)
        grouped = k[:, 0] if len(self.templates) == 1 else (k[:, 0] + k[:, 1:].mean(1)) / 2
        return grouped.T

    @torch.no_grad()
    def _z_layer_output(self, facts: list[_Fact]) -> Tensor:
        """The last edited layer's output (D, n) fp32 at the subject's last token of each bare prompt."""
        ids = _right_pad([self._ids("", f.prompt) for f in facts], self.device)
        hidden = split_hidden(layer_output(self.model, self.blocks[self.layers[-1]], input_ids=ids))[0]
        lookups = torch.tensor([self._lookup("", f) for f in facts], device=hidden.device)
        return hidden[torch.arange(len(facts), device=hidden.device), lookups].float().T

    @torch.no_grad()
    def _succeeds(self, fact: _Fact) -> bool:
        """Whether the greedy teacher-forced tokens over y_w are y_w (the success rule of `loop.run_edit`)."""
        rows = target_rows(self.model, len(fact.y_w), input_ids=torch.tensor([fact.input_ids], device=self.device))
        return teacher_forced_argmax(rows[0]).tolist() == list(fact.y_w)


def trained_names(model: nn.Module, config: LocateConfig) -> list[str]:
    """The weights `config` edits: each of its layers' MLP output projection (default layers scaled to depth)."""
    layers = config.layers if config.layers is not None else default_layers(len(find_layers(model)[1]))
    return edited_weight_names(model, layers)


def cached_locator(model: nn.Module, tokenizer, method: str, config: LocateConfig, n_texts: int, model_id: str,
                   state: dict | None = None) -> LocateThenEdit:
    """A `LocateThenEdit` whose preserved keys' second moment comes from the null-space variant's cached
    covariance of `n_texts` generic texts (`constraints.cached_covariances`), restored from `state` if given."""
    from .constraints import cached_covariances

    names = trained_names(model, config)
    device = model.get_input_embeddings().weight.device
    locator = LocateThenEdit(model, tokenizer, method, config,
                             cached_covariances(model, tokenizer, names, n_texts, model_id, device))
    if state:
        locator.load_state_dict(state)
    return locator
