"""Edit requests: the record type, the tokenization rule shared by loss and metrics."""
from __future__ import annotations

from dataclasses import dataclass, field

Answers = tuple[str, ...]
"""All aliases of an answer; scoring uses the first, as EasyEdit does."""
Probe = tuple[str, Answers]
"""A (prompt, answers) pair used by portability and locality."""


@dataclass(frozen=True)
class EditRequest:
    """One fact to write into the model: after `prompt`, the model should say `target_new`."""

    prompt: str
    target_new: str
    subject: str
    ground_truth: Answers = ()
    rephrase: tuple[str, ...] = ()
    portability: dict[str, tuple[Probe, ...]] = field(default_factory=dict)
    locality: dict[str, tuple[Probe, ...]] = field(default_factory=dict)
    source: str = ""
    """Where the record came from, `file#index`, for error messages and results."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of `prompt + ' ' + target` and the index of the first target token."""

    input_ids: tuple[int, ...]
    target_start: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.target_start :]


def encode(tokenizer, prompt: str, target: str) -> Encoded:
    """EasyEdit's rule: tokenize `prompt + ' ' + target` and `prompt` apart; the target is
    everything after the prompt's token count. Loss and metrics both use this."""
    full = tokenizer(prompt + " " + target)["input_ids"]
    start = len(tokenizer(prompt)["input_ids"])
    if start >= len(full):
        raise ValueError(f"target {target!r} tokenizes to nothing after prompt {prompt!r}")
    return Encoded(tuple(full), start)
