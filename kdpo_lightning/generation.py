"""Decoding from a model (batched, left-padded, KV cache) and generated-answer metrics.

Generated answers: the edited model must produce the answer itself, with no teacher forcing.

As "The Mirage of Model Editing" (ACL 2025, WILD) and EasyEdit's ``generate-text`` mode do: the
question goes through the model's chat template as one user turn (when it has one), decoding is
greedy and stops at EOS or another special token (the template's end of turn), at a newline, or
at the end of the first sentence (see :func:`first_answer`); the answer is scored by SQuAD-style
normalized exact match and by containment. Locality by generation: the post-edit answer equals the
pre-edit one (normalized).
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from itertools import takewhile

import torch
from torch import Tensor
from tqdm.auto import tqdm

SAMPLINGS = ("greedy", "top_k")


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def left_pad(rows: Sequence[Sequence[int]], pad_id: int,
              device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Left-pads token rows.

    Returns:
        ``input_ids (B, T)``, ``attention_mask (B, T)`` and ``position_ids (B, T)`` that count
        from 0 at each row's first real token (pads get 0).
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def by_length(lengths: Sequence[int], batch_size: int, progress: str | None = None) -> Iterable[list[int]]:
    """Indices grouped by similar length, to waste little compute on padding; with `progress`, under a
    progress bar of that name (a 500-request evaluation decodes for many minutes)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return batches if progress is None else tqdm(batches, desc=progress, unit="batch", leave=False)


def _next_token(logits: Tensor, sampling: str, generator: torch.Generator | None, top_k: int = 5) -> Tensor:
    """``(B, V)`` last-position logits -> ``(B,)`` next tokens: argmax, or EasyEdit's top-k
    sampling (softmax at temperature 1, keep the top k, renormalize, multinomial)."""
    if sampling == "greedy":
        return logits.argmax(-1)
    probs, ids = logits.float().softmax(-1).topk(top_k, dim=-1)
    choice = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=generator)
    return ids.gather(-1, choice).squeeze(-1)


def _kv_cache(out) -> dict:
    """The KV cache of a forward's output, as the keyword the next forward takes: transformers 5
    calls it ``cache`` (``past_key_values`` is deprecated there), older releases ``past_key_values``."""
    name = "cache" if "cache" in out else "past_key_values"
    return {name: out[name]}


@torch.no_grad()
def generate_texts(model: torch.nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 100,
                   sampling: str = "greedy", generator: torch.Generator | None = None,
                   batch_size: int = 16, progress: str | None = None) -> list[str]:
    """Continues each prompt by ``max_new_tokens`` tokens, batched with left padding and a KV cache.

    EasyEdit's ``generate_fast`` samples top-5 until the *total* length (prompt + new) is 100; here
    the default is greedy and the count is of *new* tokens, so every prompt gets the same amount of
    text to score whatever its length (``sampling="top_k"`` gives EasyEdit's sampler). As there,
    generation does not stop at EOS. Returns prompt + continuation decoded with
    ``skip_special_tokens``, NFKD-normalized, with ``"\\n\\n"`` replaced by a space.
    """
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    continuations = generate_ids(model, tokenizer, encoded, max_new_tokens=max_new_tokens, sampling=sampling,
                                 generator=generator, batch_size=batch_size, progress=progress)
    texts = [tokenizer.decode(list(row) + new, skip_special_tokens=True) for row, new in zip(encoded, continuations)]
    return [unicodedata.normalize("NFKD", t).replace("\n\n", " ").replace("<|endoftext|>", "") for t in texts]


@torch.no_grad()
def generate_ids(model: torch.nn.Module, tokenizer, rows: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: str = "greedy", generator: torch.Generator | None = None, batch_size: int = 16,
                 stop: Callable[[list[int]], bool] | None = None, progress: str | None = None) -> list[list[int]]:
    """New token ids after each row of prompt ids, batched with left padding and a KV cache.

    With `stop`, a row ends once `stop(new_ids)` is true of its new ids so far (the last one is
    kept), and a batch ends when all its rows have; otherwise every row gets `max_new_tokens`."""
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    out_rows: list[list[int]] = [[] for _ in rows]
    pad_id, device = pad_token_id(tokenizer), model_device(model)
    for batch in by_length([len(r) for r in rows], batch_size, progress):
        ids, mask, positions = left_pad([rows[i] for i in batch], pad_id, device)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        done = [False] * len(batch)
        for step in range(max_new_tokens):
            token = _next_token(out.logits[:, -1], sampling, generator)
            for row, (i, t) in enumerate(zip(batch, token.tolist())):
                if not done[row]:
                    out_rows[i].append(t)
                    done[row] = stop is not None and stop(out_rows[i])
            if step + 1 == max_new_tokens or all(done):
                break
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=-1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                        use_cache=True, **_kv_cache(out))
    return out_rows


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(answer: str, target: str) -> float:
    """1.0 if the normalized answer equals the normalized target."""
    return float(normalize_answer(answer) == normalize_answer(target))


def contains(answer: str, target: str) -> float:
    """1.0 if the normalized target occurs in the normalized answer as whole words
    ("male" is not in "female"); an empty target is never contained."""
    target = normalize_answer(target)
    return float(bool(target) and f" {target} " in f" {normalize_answer(answer)} ")


_LINE_BREAK = re.compile(r"[\r\n]")
_SENTENCE_END = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|\Z)")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "mt", "jr", "sr", "vs"})
"""Words whose period does not end a sentence ("St. Louis", "Martin Luther King Jr. was")."""


def _closes_abbreviation(text: str, end: re.Match) -> bool:
    """Whether a lone period closes an initial or abbreviation ("John F.", "U.S.", "St.") rather than
    a sentence: the piece of the word before it is one capital letter or in `_ABBREVIATIONS`."""
    if end.group().rstrip("\"'”’)]") != ".":
        return False
    piece = text[:end.start()].rsplit(None, 1)[-1].rsplit(".", 1)[-1]
    return (len(piece) == 1 and piece.isupper()) or piece.lower() in _ABBREVIATIONS


def first_answer(text: str) -> tuple[str, bool]:
    """The answer in generated text: its first line, up to and including the end of its first sentence.

    Leading whitespace is skipped. A sentence ends at ``.``, ``!`` or ``?`` (closing quotes or
    brackets included) followed by whitespace or the end of the text, so the periods inside "3.14"
    and "U.S." do not end it; nor does a lone period after an initial or a common abbreviation
    ("John F. Kennedy", "U.S. Army", "St. Louis"), at the cost of running past a sentence that
    really ends in one.

    Returns:
        ``(answer, ended)``: the answer, stripped, and whether the text itself shows the answer is
        over (a line break, or a sentence end followed by whitespace). A sentence end at the very end
        of the text ("3." may become "3.14") ends the answer only when decoding stops there.
    """
    text = text.lstrip()
    line = _LINE_BREAK.search(text)
    limit = line.start() if line else len(text)
    for end in _SENTENCE_END.finditer(text, 0, limit):
        if text[:end.start()].strip() and not _closes_abbreviation(text, end):
            return text[:end.end()], end.end() < len(text)
    return text[:limit].rstrip(), line is not None


def stop_token_ids(tokenizer) -> frozenset[int]:
    """Tokens that end an answer: EOS and every special added token, which includes the chat
    template's end of turn (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...)."""
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return frozenset(special | ({tokenizer.eos_token_id} - {None}))


def has_chat_template(tokenizer, required: str | None = None) -> bool:
    """Whether the tokenizer has a chat template; if not and `required` names the flag that asks for one,
    a ValueError saying so."""
    found = bool(getattr(tokenizer, "chat_template", None))
    if required and not found:
        raise ValueError(f"{required} is true, but the tokenizer has no chat template")
    return found


def prompt_ids(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    """The ids a generated answer follows: the bare prompt, or with `chat_template` the prompt as one
    user turn of the tokenizer's chat template followed by the assistant's header."""
    if not chat_template:
        return list(tokenizer(prompt)["input_ids"])
    has_chat_template(tokenizer, required="chat_template")
    turn = [{"role": "user", "content": prompt}]
    return list(tokenizer.apply_chat_template(turn, add_generation_prompt=True, return_dict=True)["input_ids"])


@torch.no_grad()
def greedy_answers(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32,
                   batch_size: int = 16, chat_template: bool = False, progress: str | None = None) -> list[str]:
    """Each prompt's greedy answer (:func:`first_answer` of the text before the first stop token),
    decoding each row until that answer has ended, a stop token or `max_new_tokens` new tokens."""
    stops = stop_token_ids(tokenizer)

    def text(new: list[int]) -> str:
        return tokenizer.decode(list(takewhile(lambda t: t not in stops, new)), skip_special_tokens=True)

    def stop(new: list[int]) -> bool:
        return new[-1] in stops or first_answer(text(new))[1]

    rows = [prompt_ids(tokenizer, p, chat_template) for p in prompts]
    new = generate_ids(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop,
                       progress=progress)
    return [first_answer(text(ids))[0] for ids in new]
