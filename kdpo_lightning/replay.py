"""Replay for long edit sequences: each edit also rehearses k earlier edits, so they are kept, not overwritten.

`Rehearsal` remembers the edits of a sequence and samples the ones the next edit rehearses (at random, or
the forgotten first among a random pool). `EditBatch` puts an edit's c+y_w and its replays' into one
left-padded batch: every row's target ends at the last position, so one forward's last n rows (n the longest
target) hold every row's target rows.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .generation import left_pad
from .objective import teacher_forced_argmax
from .policy import Policy

Replay = tuple[Tensor, int]
"""An earlier edit: its c+y_w (1, T) and where y_w starts."""


def _check(input_ids: Tensor, target_start: int) -> None:
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or not 0 < target_start < input_ids.shape[1]:
        raise ValueError(f"an edit is c+y_w of shape (1, T) with 0 < target_start < T; got shape "
                         f"{tuple(input_ids.shape)} and target_start {target_start}")


class Rehearsal:
    """The edits made so far in a sequence (token ids as plain lists, so it checkpoints as data), and
    the sample of them edit number i rehearses: k, drawn by random.Random seeded with (seed, i)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.edits: list[tuple[list[int], int]] = []

    def __len__(self) -> int:
        return len(self.edits)

    def add(self, input_ids: Tensor, target_start: int) -> None:
        """Remember an edit just made: c+y_w (1, T), y_w from `target_start`."""
        _check(input_ids, target_start)
        self.edits.append((input_ids[0].tolist(), int(target_start)))

    def sample(self, k: int, device: torch.device | str | None = None, pool: int = 0,
               policy: Policy | None = None) -> list[Replay]:
        """k of the edits made so far (all, if fewer), for the next edit: the same k for the same seed
        and position in the sequence, however often it is asked (a resumed run draws what it would have).
        With `pool` > k, `pool` are drawn and the k taken are those `policy` has forgotten, then the others."""
        if k < 0 or pool < 0:
            raise ValueError(f"the number of replays and the pool must be 0 or more, got {k} and {pool}")
        rng = random.Random(f"{self.seed}/{len(self.edits)}")
        chosen = rng.sample(range(len(self.edits)), min(max(k, pool), len(self.edits)))
        replays = [(torch.tensor([self.edits[i][0]], device=device), self.edits[i][1]) for i in chosen]
        if len(replays) <= k:
            return replays
        if policy is None:
            raise ValueError("choosing replays from a pool needs the policy, to find the edits it no longer gives")
        held = replays_held(policy, replays)
        return ([r for r, h in zip(replays, held) if not h] + [r for r, h in zip(replays, held) if h])[:k]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "edits": [[ids, start] for ids, start in self.edits]}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.edits = [(list(ids), int(start)) for ids, start in state["edits"]]


@dataclass
class EditBatch:
    """The edit (row 0) and its replays as one batch whose targets all end at the last position.
    One sequence stays as it is, without padding (the paper's forward, unchanged)."""

    input_ids: Tensor
    """(B, T), left-padded."""
    lengths: list[int]
    """Each row's target length."""
    padding: dict[str, Tensor] = field(default_factory=dict)
    """attention_mask and position_ids (counted from each row's first real token); empty for one row."""

    @classmethod
    def of(cls, input_ids: Tensor, target_start: int, replays: Sequence[Replay] = ()) -> "EditBatch":
        """[c+y_w; each replay's c+y_w], left-padded (pads: token 0, masked out)."""
        edits = [(input_ids, target_start), *replays]
        for ids, start in edits:
            _check(ids, start)
        lengths = [ids.shape[1] - start for ids, start in edits]
        if not replays:
            return cls(input_ids, lengths)
        ids, mask, positions = left_pad([ids[0].tolist() for ids, _ in edits], 0, input_ids.device)
        return cls(ids, lengths, {"attention_mask": mask, "position_ids": positions})

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def n(self) -> int:
        """The longest target: the number of rows a forward returns for every row."""
        return max(self.lengths)

    def own(self, batched: Tensor, row: int) -> Tensor:
        """Row `row`'s part of a (B, n, ...) tensor: its last `lengths[row]` positions, its own target's."""
        return batched[row, self.n - self.lengths[row]:]

    def target(self, row: int) -> Tensor:
        """y_w of row `row`."""
        return self.input_ids[row, -self.lengths[row]:]

    def held(self, y_l: Tensor) -> list[bool]:
        """Per row, whether the teacher-forced argmax y_l (B, n) equals its y_w: one device sync."""
        n = self.n
        shorter = torch.tensor([n - length for length in self.lengths], device=y_l.device)
        own = torch.arange(n, device=y_l.device) >= shorter[:, None]
        return ((y_l == self.input_ids[:, -n:]) | ~own).all(-1).tolist()


def replays_held(policy: Policy, replays: Sequence[Replay]) -> list[bool]:
    """Per earlier edit, whether the policy's teacher-forced argmax still gives its y_w: one batched forward."""
    batch = EditBatch.of(*replays[0], replays[1:])
    with torch.no_grad():
        rows = policy.rows(batch.input_ids, batch.n, **batch.padding)
    return batch.held(teacher_forced_argmax(rows))
