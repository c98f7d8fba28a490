"""Where the reference policy's log-probs come from: the model as it was when the edit started.

Three strategies behind one interface (`begin_edit`, then `rows`). `begin_edit` gets the policy's
rows on c+y_w at edit start, which are the reference's rows for that input, so no strategy runs a
forward of its own for the edit's own input:
- `cached` (default): KDPO scores y_w and y_l in the one context c+y_w, so those rows are every
  reference row the edit will ever need. No extra weights, no extra forward.
- `swap`: keep only the original values of the trained tensors and swap them in for a reference
  forward. Needed by vanilla DPO, whose y_l context changes every cycle.
- `copy`: a frozen deepcopy of the model, as in the paper's released code (doubles memory).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor

from .policy import PerInput, Policy, target_rows


class _Reference:
    """Rows of the reference for any input, each computed once per edit (the reference never
    changes during an edit, so a repeated input, e.g. c+y_l over a cycle's steps, is free).
    Every call within an edit has the same n_target (the length of y_w)."""

    def begin_edit(self, policy: Policy, input_ids: Tensor, n_target: int, rows: Tensor) -> None:
        self._rows = PerInput()
        self._rows.put(input_ids, rows.detach())

    def rows(self, input_ids: Tensor, n_target: int) -> Tensor:
        return self._rows.get(input_ids, lambda: self._no_grad_forward(input_ids, n_target))

    def _no_grad_forward(self, input_ids: Tensor, n_target: int) -> Tensor:
        with torch.no_grad():
            return self._forward(input_ids, n_target)

    def _forward(self, input_ids: Tensor, n_target: int) -> Tensor:
        raise NotImplementedError


class CachedReference(_Reference):
    """The policy's rows at edit start, kept: no forward of its own; only the edit's own input."""

    def _forward(self, input_ids: Tensor, n_target: int) -> Tensor:
        raise ValueError("the cached reference only scores the edit's own c+y_w; use reference 'swap' or 'copy'")


class SwapReference(_Reference):
    """Reference forwards with the original trained tensors swapped in, then swapped back."""

    def begin_edit(self, policy: Policy, input_ids: Tensor, n_target: int, rows: Tensor) -> None:
        super().begin_edit(policy, input_ids, n_target, rows)
        self._policy, self._original = policy, policy.original_values()

    def _forward(self, input_ids: Tensor, n_target: int) -> Tensor:
        current = self._policy.original_values()
        self._policy.load_values(self._original)
        try:
            return self._policy.rows(input_ids, n_target)
        finally:
            self._policy.load_values(current)


class CopyReference(_Reference):
    """A frozen deepcopy of the whole model taken at edit start (the paper's `pi_ref = pi.copy()`)."""

    def begin_edit(self, policy: Policy, input_ids: Tensor, n_target: int, rows: Tensor) -> None:
        super().begin_edit(policy, input_ids, n_target, rows)
        self._model = None  # free the previous edit's copy before making the next one
        self._model = copy.deepcopy(policy.model).requires_grad_(False)

    def _forward(self, input_ids: Tensor, n_target: int) -> Tensor:
        return target_rows(self._model, n_target, input_ids=input_ids)


REFERENCES = {"cached": CachedReference, "swap": SwapReference, "copy": CopyReference}


def make_reference(name: str) -> CachedReference | SwapReference | CopyReference:
    """Build a reference strategy by name: cached, swap or copy."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; choose one of {sorted(REFERENCES)}")
    return REFERENCES[name]()


DEFAULT_REFERENCE = {"kdpo": "cached", "dpo": "swap"}
"""Each preference method's reference when none is named; FT-M and the closed-form methods use none."""


def reference_for(method: str, name: str | None) -> str | None:
    """The reference `method` uses: `name`, else the method's default; checked now, not at the first edit."""
    name = name if name is not None else DEFAULT_REFERENCE.get(method)
    if method == "dpo" and name == "cached":
        raise ValueError("vanilla DPO scores y_l in a new context every cycle: use reference 'swap' or 'copy'")
    if name is not None:
        make_reference(name)
    return name
