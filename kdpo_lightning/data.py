"""Edit requests: reading benchmark files, the paper's preprocessing, the sequential-edit DataModule.

Record formats (auto-detected from the first record's keys, or named with `format=`):
  knowedit          KnowEdit ZsRE / wiki_counterfact / wiki_recent, KDPO_seq ZsRE: prompt, target_new, subject,
                    ground_truth, rephrase_prompt, portability/locality as {kind: [{prompt, ground_truth}]}
  wikibio           KnowEdit WikiBio, KDPO_seq WikiBio: text, labels, concept, locality
  zsre_mend         EasyEdit zsRE files (src, alt, answers, rephrase, loc/loc_ans, portability New Question/Answer,
                    alter_subject_question, inverse question)
  counterfact_mend  EasyEdit counterfact-{edit,train,val}: prompt, target_new, ..., locality_prompt/_ground_truth
  counterfact_rome  ROME CounterFact records with requested_rewrite (EasyEdit portability/locality files)
All strings are stripped: `encode` puts the one space between prompt and target itself.
"""
from __future__ import annotations

import json
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
from datasets import Dataset
from torch.utils.data import DataLoader, IterableDataset

from .generation import has_chat_template, prompt_ids
from .sources import find_data

Answers = tuple[str, ...]
"""All aliases of an answer; scoring uses the first, as EasyEdit does."""
Probe = tuple[str, Answers]
"""A (prompt, answers) pair used by portability and locality."""


class DataError(ValueError):
    """A benchmark file or record that cannot be used; the message names the file, record and field."""


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
    dropped_probes: int = 0
    """Portability/locality items left out because their answer was empty (EasyEdit drops them too)."""


@dataclass(frozen=True)
class Encoded:
    """Token ids of `prompt + ' ' + target` and the index of the first target token."""

    input_ids: tuple[int, ...]
    target_start: int

    @property
    def target_ids(self) -> tuple[int, ...]:
        return self.input_ids[self.target_start :]


def encode(tokenizer, prompt: str, target: str, chat_template: bool = False) -> Encoded:
    """Tokenize `prompt + ' ' + target`; the target (y_w) is every token after the prompt's tokens. With
    `chat_template`, the prompt is one user turn of the tokenizer's chat template and the target the start of
    the assistant's answer (what a chat model generates after), as `generation.prompt_ids` poses questions.

    This is EasyEdit's rule (loss and metrics both use it): the target starts at the token count of
    `tokenizer(prompt)`, BOS included. It is exact whenever the prompt's tokens are a prefix of the full
    tokens, as for byte-level BPE (GPT-2, LLaMA-3, Qwen) and whitespace-splitting sentencepiece (LLaMA-2).
    A tokenizer that merges across the space (no pre-tokenizer) breaks that; then, for fast tokenizers,
    the target starts at the first token holding a target character, so a token spanning the boundary
    counts as target and y_w covers the whole target plus those few prompt characters.
    """
    if not target.strip():
        raise ValueError(f"empty target after prompt {prompt!r}")
    if chat_template:
        head = prompt_ids(tokenizer, prompt, chat_template=True)
        return Encoded(tuple(head + tokenizer(target.strip(), add_special_tokens=False)["input_ids"]), len(head))
    text = prompt + " " + target
    full = tokenizer(text)["input_ids"]
    bare = tokenizer(prompt)["input_ids"]
    start = len(bare)
    if full[:start] != bare and getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        start = next(i for i, (_, end) in enumerate(offsets) if end > len(prompt) + 1)
    if start >= len(full):
        raise ValueError(f"target {target!r} tokenizes to nothing after prompt {prompt!r}")
    return Encoded(tuple(full), start)


# ----------------------------------------------------------------------------- record formats


class ProbeSpec(NamedTuple):
    """Probes from a prompt field (a string or a list sharing one answer) and an answer field."""

    group: str  # "portability" or "locality"
    kind: str
    prompt: str
    answer: str
    fill: bool = False  # the prompt field holds a subject to put into the record's prompt template


@dataclass(frozen=True)
class Format:
    """Where each EditRequest field lives in one record schema (dotted paths into the record)."""

    detect: frozenset[str]  # keys of the first record that identify the format
    prompt: str
    target: str
    subject: str
    ground_truth: str | None = None
    rephrase: str | None = None
    probe_dicts: tuple[str, ...] = ()  # KnowEdit-style {kind: [{prompt, ground_truth}]} fields, named as the group
    probes: tuple[ProbeSpec, ...] = ()
    template: bool = False  # `prompt` is a ROME template like "{} was born in", filled with the subject


_NEW, _TRUE = "requested_rewrite.target_new.str", "requested_rewrite.target_true.str"
_ONE_HOP = ProbeSpec("portability", "one_hop", "portability.New Question", "portability.New Answer")

FORMATS: dict[str, Format] = {  # in auto-detection order, most specific first
    "counterfact_rome": Format(
        frozenset({"requested_rewrite"}), "requested_rewrite.prompt", _NEW, "requested_rewrite.subject",
        ground_truth=_TRUE, rephrase="paraphrase_prompts", template=True, probes=(
            ProbeSpec("locality", "neighborhood", "neighborhood_prompts", _TRUE),
            ProbeSpec("locality", "distracting_neighbor", "distracting_neighborhood_prompts", _TRUE),
            ProbeSpec("locality", "other_attribution", "unrelated_relation.question", "unrelated_relation.object"),
            _ONE_HOP,
            ProbeSpec("portability", "subject_replace", "alternative_subject", _NEW, fill=True),
        )),
    "zsre_mend": Format(
        frozenset({"src", "alt"}), "src", "alt", "subject", ground_truth="answers", rephrase="rephrase", probes=(
            ProbeSpec("locality", "neighborhood", "loc", "loc_ans"),
            _ONE_HOP,
            ProbeSpec("portability", "subject_replace", "alter_subject_question", "alt"),
            ProbeSpec("portability", "inverse_relation", "inverse question", "subject"),
        )),
    "wikibio": Format(frozenset({"text", "labels"}), "text", "labels", "concept", probe_dicts=("locality",)),
    "counterfact_mend": Format(
        frozenset({"locality_prompt", "target_new"}), "prompt", "target_new", "subject",
        ground_truth="ground_truth", rephrase="rephrase_prompt",
        probes=(ProbeSpec("locality", "neighborhood", "locality_prompt", "locality_ground_truth"),)),
    "knowedit": Format(
        frozenset({"prompt", "target_new"}), "prompt", "target_new", "subject", ground_truth="ground_truth",
        rephrase="rephrase_prompt", probe_dicts=("portability", "locality")),
}


def _get(record: dict, path: str | None, where: str) -> Any:
    """The value at a dotted path, or None when a key (or the path) is missing."""
    value: Any = record if path else None
    for key in path.split(".") if path else ():
        if value is None:
            return None
        if not isinstance(value, dict):
            raise DataError(f"{where} field {path!r}: expected an object at {key!r}, got {type(value).__name__}")
        value = value.get(key)
    return value


def _text(value: Any, where: str, name: str) -> str:
    """A required non-empty string, stripped."""
    if value is None:
        raise DataError(f"{where}: missing field {name!r}")
    if not isinstance(value, str):
        raise DataError(f"{where} field {name!r}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where} field {name!r}: empty string")
    return value.strip()


def _strings(value: Any, where: str, name: str | None, required: bool = False) -> tuple[str, ...]:
    """A string or (nested) list of strings, flattened, stripped, empties left out; a missing one is ()."""
    if value is None and required:
        raise DataError(f"{where}: missing field {name!r}")
    if value is None:
        return ()
    if isinstance(value, str):
        return (value.strip(),) if value.strip() else ()
    if isinstance(value, list):
        return tuple(s for v in value for s in _strings(v, where, name))
    raise DataError(f"{where} field {name!r}: expected a string or a list of strings, got {type(value).__name__}")


def _probes(record: dict, fmt: Format, template: str, where: str) -> Iterator[tuple[str, str, str, Answers]]:
    """Every (group, kind, prompt, answers) probe of a record, answers possibly empty."""
    for group in fmt.probe_dicts:
        kinds = record.get(group)
        if kinds is None:
            continue
        if not isinstance(kinds, dict):
            raise DataError(f"{where} field {group!r}: expected an object {{kind: [probes]}}, "
                            f"got {type(kinds).__name__}")
        for kind, items in kinds.items():
            if not isinstance(items, list):
                raise DataError(f"{where} field '{group}.{kind}': expected a list, got {type(items).__name__}")
            for j, item in enumerate(items):
                name = f"{group}.{kind}[{j}]"
                if not isinstance(item, dict):
                    raise DataError(f"{where} field {name!r}: expected an object, got {type(item).__name__}")
                answers = _strings(item.get("ground_truth"), where, name + ".ground_truth", required=True)
                yield group, kind, _text(item.get("prompt"), where, name + ".prompt"), answers
    for spec in fmt.probes:
        prompts = _strings(_get(record, spec.prompt, where), where, spec.prompt)
        if not prompts:
            continue
        answers = _strings(_get(record, spec.answer, where), where, spec.answer, required=True)
        for prompt in prompts:
            yield spec.group, spec.kind, template.replace("{}", prompt) if spec.fill else prompt, answers


def _read_record(record: Any, fmt: Format, path: Path, index: int) -> EditRequest:
    """One raw record as an EditRequest; DataError names the record and field at fault."""
    where = f"{path}#{index}"
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    subject = _text(_get(record, fmt.subject, where), where, fmt.subject)
    prompt = template = _text(_get(record, fmt.prompt, where), where, fmt.prompt)
    if fmt.template:
        if "{}" not in template:
            raise DataError(f"{where} field {fmt.prompt!r}: template has no '{{}}' for the subject")
        prompt = template.replace("{}", subject)
    groups: dict[str, dict[str, list[Probe]]] = {"portability": {}, "locality": {}}
    dropped = 0
    for group, kind, probe_prompt, answers in _probes(record, fmt, template, where):
        if answers:
            groups[group].setdefault(kind, []).append((probe_prompt, answers))
        else:
            dropped += 1
    return EditRequest(
        prompt=prompt,
        target_new=_text(_get(record, fmt.target, where), where, fmt.target),
        subject=subject,
        ground_truth=_strings(_get(record, fmt.ground_truth, where), where, fmt.ground_truth),
        rephrase=_strings(_get(record, fmt.rephrase, where), where, fmt.rephrase),
        portability={k: tuple(v) for k, v in groups["portability"].items()},
        locality={k: tuple(v) for k, v in groups["locality"].items()},
        source=f"{path.name}#{index}",
        dropped_probes=dropped,
    )


# ----------------------------------------------------------------------------- loading


def _check(name: str, value: Any, choices) -> None:
    """Fail fast on a misspelt option, listing the choices."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _read_json(path: Path) -> list:
    """The file's JSON list of records; anything else is a DataError naming the file."""
    if path.is_dir():  # name a few JSON files in it, or one level down, to pass instead
        found = sorted(p.relative_to(path).as_posix() for p in [*path.glob("*.json"), *path.glob("*/*.json")])
        if not found:
            raise DataError(f"{path} is a directory, not a JSON file, with no JSON files in it or one folder down")
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise DataError(f"{path} is a directory, not a JSON file; pass one of the JSON files in it: "
                        f"{', '.join(found[:5])}{more}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".jsonl":
        raise DataError(f"{path}: JSON Lines is not an edit format; edit benchmarks are JSON lists of records")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is allowed
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if isinstance(data, dict) and data.keys() & {"K_F", "K_R", "success"}:
        raise DataError(f"{path}: KnowEdit Sanitation (trivia_qa) files are not supported")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of edit records, got {type(data).__name__}")
    if data and isinstance(data[0], dict) and {"ent", "pos", "neg"} <= data[0].keys():
        raise DataError(f"{path}: KnowEdit Convsent (sentiment editing) files are not supported")
    return data


def _detect(first: Any, path: Path) -> str:
    """The format name whose identifying keys the first record has."""
    keys = first.keys() if isinstance(first, dict) else set()
    for name, fmt in FORMATS.items():
        if fmt.detect <= keys:
            return name
    raise DataError(f"{path}#0: cannot tell the edit format from keys {sorted(keys)}; pass format= one of "
                    f"{list(FORMATS)}")


def _load(path: str | Path, format: str, on_bad_record: str) -> tuple[list[EditRequest], dict]:
    """load_requests, plus what happened: the format used, the record count, the records skipped."""
    _check("format", format, ("auto", *FORMATS))
    _check("on_bad_record", on_bad_record, ("error", "skip"))
    path = find_data(path)
    records = _read_json(path)
    if not records:
        raise DataError(f"{path}: no records")
    name = _detect(records[0], path) if format == "auto" else format
    requests, errors = [], []
    for i, record in enumerate(records):
        try:
            requests.append(_read_record(record, FORMATS[name], path, i))
        except DataError as e:
            if on_bad_record == "error":
                raise
            errors.append(e)
    if errors:
        warnings.warn(f"{path}: skipped {len(errors)} of {len(records)} bad records; first: {errors[0]}",
                      stacklevel=3)
    if not requests:
        raise DataError(f"{path}: none of its {len(records)} records is usable")
    return requests, {"file": str(path), "format": name, "records": len(records), "skipped_records": len(errors)}


def load_requests(path: str | Path, format: str = "auto", on_bad_record: str = "error") -> list[EditRequest]:
    """Read an edit benchmark file (see FORMATS), or a data set by name (`sources.find_data`), into
    EditRequests; bad records raise, or warn with "skip"."""
    return _load(path, format, on_bad_record)[0]


def select_requests(
    requests: list[EditRequest], n: int | None = None, same_subject_filter: bool = True,
    sample: str = "first", seed: int = 0,
) -> tuple[list[EditRequest], dict]:
    """The paper's preprocessing: drop repeats of an earlier subject, then keep the first or a seeded random N."""
    _check("sample", sample, ("first", "random"))
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of edits or None, got {n}")
    kept, seen = [], set()
    for r in requests:
        if not (same_subject_filter and r.subject in seen):
            kept.append(r)
        seen.add(r.subject)
    chosen = kept
    if n is not None and n < len(kept):
        picks = range(n) if sample == "first" else sorted(random.Random(seed).sample(range(len(kept)), n))
        chosen = [kept[i] for i in picks]
    elif n is not None and n > len(kept):
        warnings.warn(f"asked for {n} edits, only {len(kept)} left after filtering; using all of them", stacklevel=2)
    if not chosen:
        file = requests[0].source.split("#")[0] if requests else "no requests"
        raise DataError(f"{file}: no edit requests left (same_subject_filter={same_subject_filter}, n={n})")
    return chosen, {
        "requests": len(requests), "same_subject_dropped": len(requests) - len(kept), "n": n, "sample": sample,
        "seed": seed, "selected": len(chosen), "dropped_probes": sum(r.dropped_probes for r in chosen),
    }


PROBE_KINDS = ("rewrite", "rephrase", "portability", "locality")


def probe_rows(requests: list[EditRequest], kind: str) -> list[dict]:
    """Flat probe rows {request, kind, prompt, answer (first alias)} of one metric family, in request order."""
    _check("probe kind", kind, PROBE_KINDS)
    rows = []
    for i, r in enumerate(requests):
        if kind == "rewrite":
            probes = [("rewrite", r.prompt, r.target_new)]
        elif kind == "rephrase":
            probes = [("rephrase", p, r.target_new) for p in r.rephrase]
        else:
            probes = [(k, p, answers[0]) for k, items in getattr(r, kind).items() for p, answers in items]
        rows += [{"request": i, "kind": k, "prompt": p, "answer": a} for k, p, a in probes]
    return rows


# ----------------------------------------------------------------------------- DataModule


class _EditStream(IterableDataset):
    """Edit rows from `start` on. It has no length on purpose: Lightning then runs a resumed epoch to the end
    of the stream instead of stopping after len(loader) minus the batches it already counted.

    Sharded over `world` processes, process `rank` gets rows start+rank, start+rank+world, ...; a process
    with one row fewer gets a padding row {"index": -1} so that all run the same number of steps."""

    def __init__(self, edits: Dataset, start: int, rank: int = 0, world: int = 1) -> None:
        self.edits, self.start, self.rank, self.world = edits, start, rank, world

    def __iter__(self) -> Iterator[dict]:
        rounds = -(-(len(self.edits) - self.start) // self.world)
        for i in range(self.start + self.rank, self.start + rounds * self.world, self.world):
            yield self.edits[i] if i < len(self.edits) else {"index": -1}


class SequentialEditDataModule(L.LightningDataModule):
    """Edits in a fixed order, one per batch, resumable from checkpoints; probe rows for the metrics.
    Under DDP (single-edit mode) each process gets an interleaved shard of the edits.

    The LightningModule owns the tokenizer and attaches it with `set_tokenizer` before fitting. After it
    has applied the edit of a batch it calls `mark_done(batch["index"])`; `state_dict()` saves that
    position, so a run resumed from a checkpoint starts at the next edit. Resuming is for one process.
    """

    def __init__(
        self, path: str, format: str = "auto", n_edits: int | None = None, same_subject_filter: bool = True,
        sample: str = "first", seed: int = 0, on_bad_record: str = "error", eval_batch_size: int = 16,
    ) -> None:
        super().__init__()
        _check("format", format, ("auto", *FORMATS))
        _check("sample", sample, ("first", "random"))
        _check("on_bad_record", on_bad_record, ("error", "skip"))
        if n_edits is not None and n_edits < 1:
            raise ValueError(f"n_edits must be at least 1 (or null for all), got {n_edits}")
        self.save_hyperparameters()
        self.tokenizer = None
        self.chat_template = False
        self.requests: list[EditRequest] = []
        self.report: dict = {}
        self.position = 0  # edits of the sequence already applied
        self._resume_n: int | None = None
        self._edits: Dataset | None = None

    def set_tokenizer(self, tokenizer, chat_template: bool = False) -> None:
        """Attach the model's tokenizer (the edits are tokenized with it on first use), and whether each edit's
        prompt goes through its chat template (`EditConfig.chat_template`, `data.encode`)."""
        has_chat_template(tokenizer, required="edit.chat_template" if chat_template else None)
        self.tokenizer, self.chat_template, self._edits = tokenizer, chat_template, None

    def setup(self, stage: str | None = None) -> None:
        """Load and select the requests once; tokenize them too once the tokenizer is attached."""
        if not self.requests:
            hp = self.hparams
            requests, info = _load(hp.path, hp.format, hp.on_bad_record)
            self.requests, report = select_requests(requests, hp.n_edits, hp.same_subject_filter, hp.sample, hp.seed)
            self.report = {**info, **report}
        if self.tokenizer is not None and self._edits is None:
            rows = [{"index": i, "prompt": r.prompt, "target": r.target_new, "source": r.source}
                    for i, r in enumerate(self.requests)]
            ds = Dataset.from_list(rows).map(self._encode_row, remove_columns=["prompt", "target", "source"],
                                             desc="Tokenizing edits")
            self._edits = ds.with_format("torch", columns=["input_ids"], output_all_columns=True)

    def edits(self) -> Dataset:
        """The tokenized sequence: rows {index, input_ids (prompt + ' ' + target), target_start}."""
        if self.tokenizer is None:
            raise RuntimeError("call set_tokenizer(tokenizer) before using the edits")
        self.setup()
        return self._edits

    def _encode_row(self, row: dict) -> dict:
        """`encode` one edit; a target that tokenizes to nothing is a DataError naming its record."""
        try:
            enc = encode(self.tokenizer, row["prompt"], row["target"], self.chat_template)
        except ValueError as e:
            raise DataError(f"{row['source']} field 'target': {e}") from None
        return {"input_ids": list(enc.input_ids), "target_start": enc.target_start}

    def check_lengths(self, config) -> None:
        """Fail before the first edit if any c+y_w is longer than the context of a model with this `config`."""
        limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        for row in self.edits() if limit else ():
            if len(row["input_ids"]) > limit:
                raise ValueError(f"{self.requests[int(row['index'])].source}: prompt + target is "
                                 f"{len(row['input_ids'])} tokens, longer than the model's context of {limit}")

    def train_dataloader(self) -> DataLoader:
        """Remaining edits in order, never shuffled: one {index, input_ids (T,), target_start} dict per batch."""
        edits = self.edits()
        if self._resume_n is not None and self._resume_n != len(edits):
            raise ValueError(f"the checkpoint's edit sequence has {self._resume_n} edits, this run selects "
                             f"{len(edits)}; resume with the same data arguments")
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return DataLoader(_EditStream(edits, self.position, rank, world), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        """The whole sequence, for `validate`/`test`: they score a saved edit without editing."""
        return DataLoader(_EditStream(self.edits(), 0), batch_size=None)

    test_dataloader = val_dataloader

    def probe_dataloader(self, kind: str) -> DataLoader:
        """Probe rows of one kind (see `probe_rows`) in lists of `eval_batch_size`."""
        self.setup()
        rows = probe_rows(self.requests, kind)
        return DataLoader(rows, batch_size=self.hparams.eval_batch_size, shuffle=False, collate_fn=list)

    def mark_done(self, index: int) -> None:
        """Record that edit `index` of the sequence is applied; edits must be marked in order."""
        if index > self.position:
            raise ValueError(f"edit {index} marked done before edit {self.position}")
        self.position = max(self.position, index + 1)

    def state_dict(self) -> dict:
        """The resume position, saved in Lightning checkpoints."""
        return {"position": self.position, "n_requests": len(self.requests)}

    def load_state_dict(self, state_dict: dict) -> None:
        """Continue at the checkpoint's position; `train_dataloader` checks the sequence length matches."""
        self.position, self._resume_n = state_dict["position"], state_dict.get("n_requests")
