"""Benchmark readers, the paper's preprocessing, the tokenization rule and the sequential DataModule."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import DEMO_ZSRE, FIXTURES, full_data

from kdpo_lightning import sources
from kdpo_lightning.sources import find_data
from kdpo_lightning.data import (
    DataError,
    EditRequest,
    SequentialEditDataModule,
    encode,
    load_requests,
    probe_rows,
    select_requests,
)

EP = "EasyEdit_portability"
ZSRE = DEMO_ZSRE

# (file, documented record count, detected format, probe items dropped for an empty answer)
EDIT_FILES = [
    ("ZsRE/ZsRE-test-all.json", 1301, "knowedit", 0),
    ("WikiBio/wikibio-test-all.json", 306, "wikibio", 0),
    ("WikiBio/wikibio-train-all.json", 464, "wikibio", 0),
    ("wiki_counterfact/train_cf.json", 1427, "knowedit", 0),
    ("wiki_recent/recent_train.json", 570, "knowedit", 0),
    ("KDPO_seq/benchmark_ZsRE_ZsRE-test-all_seq.json", 1068, "knowedit", 0),
    ("KDPO_seq/benchmark_WikiBio_wikibio-test-all_seq.json", 74, "wikibio", 0),
    (f"{EP}/portability/One Hop/zsre_mend_eval_portability_gpt4.json", 1037, "zsre_mend", 0),
    (f"{EP}/portability/One Hop/counterfact_portability_gpt4.json", 1031, "counterfact_rome", 0),
    (f"{EP}/portability/Subject Replace/zsre_subject_replace.json", 293, "zsre_mend", 0),
    (f"{EP}/portability/Subject Replace/counterfact_subject_replace.json", 213, "counterfact_rome", 0),
    (f"{EP}/portability/Inverse Relation/zsre_inverse_relation.json", 385, "zsre_mend", 0),
    (f"{EP}/locality/Distracting Neighbor/counterfact_distracting_neighbor.json", 804, "counterfact_rome", 0),
    (f"{EP}/locality/Other Attribution/counterfact_other_attribution.json", 804, "counterfact_rome", 0),
    (f"{EP}/counterfact/counterfact-edit.json", 10000, "counterfact_mend", 0),
    (f"{EP}/counterfact/counterfact-train.json", 10000, "counterfact_mend", 0),
    (f"{EP}/counterfact/counterfact-val.json", 1919, "counterfact_mend", 0),
]


@pytest.fixture(scope="module")
def zsre() -> list[EditRequest]:
    return load_requests(ZSRE)


def _empty_answers(value) -> bool:
    while isinstance(value, list):
        value = value[0] if value else ""
    return not value.strip()


# ----------------------------------------------------------------------------- readers


@pytest.mark.parametrize("rel, count, fmt, dropped", EDIT_FILES, ids=[Path(f[0]).name for f in EDIT_FILES])
def test_every_edit_file_loads_with_documented_count(rel, count, fmt, dropped):
    path = full_data(rel)
    requests = load_requests(path)
    assert len(requests) == count
    assert load_requests(path, format=fmt) == requests  # auto-detection picked `fmt`
    assert sum(r.dropped_probes for r in requests) == dropped
    assert requests[0].source == f"{path.name}#0" and requests[-1].source == f"{path.name}#{count - 1}"
    for r in requests:
        assert r.prompt and r.target_new and r.subject
        assert r.prompt == r.prompt.strip() and r.target_new == r.target_new.strip()
        for probes in [*r.portability.values(), *r.locality.values()]:
            assert probes and all(prompt and answers and answers[0] for prompt, answers in probes)


def test_zsre_mapping_matches_first_record(zsre):
    raw = json.loads(ZSRE.read_text())
    r = zsre[0]
    assert (r.prompt, r.target_new, r.subject) == (raw[0]["prompt"], "Noctuidae", "Epaspidoceras")
    assert r.ground_truth == ("Aspidoceratidae",)
    assert r.rephrase == ("What family are Epaspidoceras?",)
    assert r.locality == {"Relation_Specificity": (("The taxon rank of Epaspidoceras is", ("genus",)),
                                                   ("Epaspidoceras taxon rank", ("genus",)))}
    assert r.portability == {"Reasoning": (("What is the common name for the family Epaspidoceras belongs to?",
                                            ("Owlet moths",)),)}
    assert zsre[32].ground_truth == ("Minnesota Wild", "Columbus Blue Jackets")  # all aliases kept
    assert zsre[16].target_new == "Charity River"  # the file has " Charity River": stripped
    n_probes = {"locality": 0, "portability": 0}
    for rec in raw:
        for group in n_probes:
            n_probes[group] += sum(len(items) for items in rec[group].values())
    assert n_probes == {g: sum(len(p) for r in zsre for p in getattr(r, g).values()) for g in n_probes}


def test_wikibio_mapping():
    raw = json.loads((FIXTURES / "WikiBio" / "wikibio-test-all.json").read_text())[0]
    r = load_requests(FIXTURES / "WikiBio" / "wikibio-test-all.json")[0]
    assert (r.prompt, r.target_new, r.subject) == (raw["text"].strip(), raw["labels"], "john russell reynolds")
    assert r.portability == {} and r.rephrase == () and r.ground_truth == ()
    assert r.locality["Relation_Specificity"][0] == ("The field of work of john russell reynolds is", ("medicine",))


def test_wiki_recent_aliases_are_flattened():
    requests = load_requests(FIXTURES / "wiki_recent" / "recent_train.json")
    r = requests[0]
    assert (r.prompt, r.target_new, r.subject) == ("The gender of Ingrīda Amantova is", "female", "Ingrīda Amantova")
    assert r.locality["Relation_Specificity"][0] == ("The place of birth of Ingrīda Amantova is", ("Cēsis",))
    ussr = r.locality["Relation_Specificity"][1][1]
    assert ussr[:3] == ("Soviet Union", "USSR", "U.S.S.R.") and len(ussr) == 13
    assert set(requests[1].locality) == {"Relation_Specificity", "Forgetfulness"}
    assert requests[2].portability == {}  # record 246 of the full file has no portability field at all


def test_wiki_counterfact_mapping():
    requests = load_requests(FIXTURES / "wiki_counterfact" / "train_cf.json")
    r = requests[0]
    assert (r.target_new, r.ground_truth) == ("Franche-Comté", ("France",))
    assert set(r.portability) == {"Reasoning", "Subject_Aliasing"} and set(r.locality) == {"Relation_Specificity"}
    assert requests[2].ground_truth == ()  # record 629: empty old answer; the request stays, ground truth empty


def test_zsre_mend_mapping():
    r = load_requests(FIXTURES / EP / "portability" / "One Hop" / "zsre_mend_eval_portability_gpt4.json")[0]
    assert (r.prompt, r.target_new, r.subject) == (
        "When was the inception of IAAF Combined Events Challenge?", "2006", "IAAF Combined Events Challenge")
    assert r.rephrase == ("When was the IAAF Combined Events Challenge launched?",)
    assert r.ground_truth == ("1998",)
    assert r.locality == {"neighborhood": (("nq question: what is the name of the last episode of spongebob",
                                            ("The String",)),)}
    assert r.portability["one_hop"][0][1] == ("Athletics",)
    inverse = load_requests(FIXTURES / EP / "portability" / "Inverse Relation" / "zsre_inverse_relation.json")[0]
    assert inverse.portability == {"inverse_relation": (("Who is Marian Clairmont's sister?", ("Claire Clairmont",)),)}
    alias = load_requests(FIXTURES / EP / "portability" / "Subject Replace" / "zsre_subject_replace.json")[0]
    assert alias.portability == {"subject_replace": (("What is the constellation of UGC 6870?", ("Triangulum",)),)}


def test_counterfact_mappings():
    mend = load_requests(FIXTURES / EP / "counterfact" / "counterfact-edit.json")[0]
    assert (mend.prompt, mend.target_new, mend.subject, mend.ground_truth) == (
        "The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux", ("French",))
    assert mend.rephrase == ("Where Danielle Darrieux is from, people speak the language of",)
    assert mend.locality == {"neighborhood": (("Michel Rocard is a native speaker of", ("French",)),)}
    rome = load_requests(FIXTURES / EP / "locality" / "Distracting Neighbor" / "counterfact_distracting_neighbor.json")[0]
    assert (rome.prompt, rome.target_new, rome.ground_truth) == ("Spike Hughes originates from", "Philadelphia",
                                                                 ("London",))
    assert len(rome.rephrase) == 2 and rome.locality["neighborhood"][0] == ("Max Mosley originates from", ("London",))
    assert len(rome.locality["distracting_neighbor"]) == 10
    assert rome.locality["other_attribution"] == (("What is Spike Hughes an instance of?", ("human",)),)
    assert rome.portability["one_hop"][0][1] == ("Cheesesteaks",)
    alias = load_requests(FIXTURES / EP / "portability" / "Subject Replace" / "counterfact_subject_replace.json")[0]
    assert alias.portability == {"subject_replace": (("Mary Eliza Wright passed away in", ("Birmingham",)),)}


@pytest.mark.parametrize("rel, why", [
    ("Convsent/blender_test.json", "Convsent"),
    ("Sanitation/trivia_qa_test.json", "Sanitation"),
    ("Sanitation/trivia_qa_train.json", "Sanitation"),
    (f"{EP}/locality/Commonsense Task/piqa_valid.jsonl", "not an edit format"),
])
def test_unsupported_files_raise_clearly(rel, why):
    with pytest.raises(DataError, match=why):
        load_requests(FIXTURES / rel)


def test_unknown_format_name():
    with pytest.raises(ValueError, match="format must be one of .*got 'mquake'"):
        load_requests(ZSRE, format="mquake")


def test_bundled_demo_is_the_first_50_zsre_records():
    full = json.loads(full_data("ZsRE/ZsRE-test-all.json").read_text())
    assert json.loads(DEMO_ZSRE.read_text()) == full[:50]
    assert load_requests("demo/zsre") == load_requests(DEMO_ZSRE)


def test_names_are_found_on_the_search_path_in_order(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        (folder / "wiki_recent").mkdir(parents=True)
        shutil.copy(FIXTURES / "wiki_recent" / "recent_train.json", folder / "wiki_recent")
    monkeypatch.setenv("KDPO_LIGHTNING_DATA", f"{first}{os.pathsep}{second}")
    assert find_data("knowedit/wiki_recent") == first / "wiki_recent" / "recent_train.json"
    (first / "wiki_recent" / "recent_train.json").unlink()
    assert find_data("knowedit/wiki_recent") == second / "wiki_recent" / "recent_train.json"
    assert len(load_requests("knowedit/wiki_recent")) == 3
    assert find_data("my/edits.json") == Path("my/edits.json")  # not a name: a file path


def test_missing_named_data_set_says_where_it_looked_and_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("KDPO_LIGHTNING_DATA", str(tmp_path / "nothing-here"))
    monkeypatch.setattr(sources, "data_dirs", lambda: [tmp_path / "nothing-here", tmp_path / "cache" / "data"])
    with pytest.raises(FileNotFoundError) as err:
        load_requests("knowedit/wikibio")
    message = str(err.value)
    assert message.startswith("data set 'knowedit/wikibio' (WikiBio/wikibio-test-all.json) not found. Looked in:")
    assert str(tmp_path / "nothing-here" / "WikiBio" / "wikibio-test-all.json") in message
    assert str(tmp_path / "cache" / "data" / "WikiBio" / "wikibio-test-all.json") in message
    assert "zjunlp/KnowEdit" in message and "EasyEdit" in message


def test_default_search_path(monkeypatch):
    monkeypatch.delenv("KDPO_LIGHTNING_DATA", raising=False)
    monkeypatch.delenv("KDPO_LIGHTNING_CACHE", raising=False)
    assert sources.data_dirs() == [Path(sources.__file__).resolve().parents[2] / "shared" / "data",
                                   Path.home() / ".cache" / "kdpo_lightning" / "data"]


def test_file_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + DEMO_ZSRE.read_bytes())
    assert load_requests(path)[:3] == [replace(r, source=r.source.replace("zsre.json", "bom.json"))
                                       for r in load_requests(DEMO_ZSRE)[:3]]


def test_empty_probe_answer_is_dropped_and_counted(tmp_path):
    forget = [{"prompt": "a", "ground_truth": [[""]]}, {"prompt": "b", "ground_truth": "x"}]
    rec = {"prompt": "p", "target_new": "t", "subject": "s",
           "locality": {"Forgetfulness": forget, "Relation_Specificity": [{"prompt": "c", "ground_truth": ""}]}}
    (tmp_path / "f.json").write_text(json.dumps([rec]))
    (r,) = load_requests(tmp_path / "f.json")
    assert r.locality == {"Forgetfulness": (("b", ("x",)),)} and r.dropped_probes == 2


# ----------------------------------------------------------------------------- preprocessing


def _req(subject: str, i: int) -> EditRequest:
    return EditRequest(prompt=f"p{i}", target_new=f"t{i}", subject=subject, source=f"toy.json#{i}")


def test_same_subject_filter_on_toy_list():
    requests = [_req(s, i) for i, s in enumerate("abacbdd")]
    chosen, report = select_requests(requests)
    assert [r.prompt for r in chosen] == ["p0", "p1", "p3", "p5"]
    assert report["same_subject_dropped"] == 3 and report["selected"] == 4
    assert select_requests(requests, same_subject_filter=False)[0] == requests
    assert [r.prompt for r in select_requests(requests, n=2)[0]] == ["p0", "p1"]


def test_same_subject_filter_on_zsre():
    full = full_data("ZsRE/ZsRE-test-all.json")
    zsre = load_requests(full)
    seen, expected = set(), []
    for rec in json.loads(full.read_text()):
        if rec["subject"].strip() not in seen:
            expected.append(rec["prompt"])
        seen.add(rec["subject"].strip())
    chosen, report = select_requests(zsre)
    assert [r.prompt for r in chosen] == expected
    assert report["same_subject_dropped"] == len(zsre) - len(expected) == 1301 - 1068
    kdpo_seq = load_requests(full_data("KDPO_seq/benchmark_ZsRE_ZsRE-test-all_seq.json"))
    assert [r.prompt for r in chosen] == [r.prompt for r in kdpo_seq]  # the paper's published subset


def test_seeded_random_sample_is_deterministic_and_ordered(zsre):
    a, report = select_requests(zsre, n=20, sample="random", seed=3)
    b, _ = select_requests(zsre, n=20, sample="random", seed=3)
    c, _ = select_requests(zsre, n=20, sample="random", seed=4)
    assert a == b and a != c and len(a) == report["selected"] == 20
    positions = [zsre.index(r) for r in a]
    assert positions == sorted(positions)
    assert [r.prompt for r in select_requests(zsre, n=3)[0]] == [r.prompt for r in zsre[:3]]


def test_select_errors(zsre):
    with pytest.raises(DataError, match=r"no edit requests left \(same_subject_filter=True, n=None\)"):
        select_requests([])
    with pytest.raises(ValueError, match="sample"):
        select_requests(zsre, sample="shuffle")
    with pytest.raises(ValueError, match="positive"):
        select_requests(zsre, n=0)
    with pytest.warns(UserWarning, match="only 2 left"):
        assert len(select_requests([_req("a", 0), _req("b", 1)], n=5)[0]) == 2


# ----------------------------------------------------------------------------- bad input


def _write(tmp_path: Path, records, name: str = "bad.json") -> Path:
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return path


GOOD = {"prompt": "Who wrote X?", "target_new": "Y", "subject": "X"}


@pytest.mark.parametrize("bad, field", [
    ({"target_new": "Y", "subject": "X"}, "prompt"),
    ({"prompt": "Who wrote X?", "subject": "X"}, "target_new"),
    ({**GOOD, "target_new": "  "}, "target_new"),
    ({**GOOD, "prompt": ["Who wrote X?"]}, "prompt"),
    ({**GOOD, "prompt": 7}, "prompt"),
    ({**GOOD, "locality": [{"prompt": "a", "ground_truth": "b"}]}, "locality"),
    ({**GOOD, "portability": {"Reasoning": [{"prompt": "a", "ground_truth": 3}]}},
     "portability.Reasoning[0].ground_truth"),
    ({**GOOD, "ground_truth": {"a": 1}}, "ground_truth"),
    ({**GOOD, "locality": {"Forgetfulness": [{"prompt": "a"}]}}, "locality.Forgetfulness[0].ground_truth"),
    ({**GOOD, "locality": {"Forgetfulness": {"prompt": "a"}}}, "locality.Forgetfulness"),
    ("not a record", "expected a JSON object"),
])
def test_bad_record_names_file_index_and_field(tmp_path, bad, field):
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(DataError) as err:
        load_requests(path)
    assert "bad.json" in str(err.value) and "#1" in str(err.value) and field in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.json: no such file"):
        load_requests(tmp_path / "nope.json")


def test_not_json_names_line(tmp_path):
    path = _write(tmp_path, '[\n  {"prompt": "a",\n   "target_new": }\n]')
    with pytest.raises(DataError, match=r"bad.json: not valid JSON at line 3"):
        load_requests(path)


@pytest.mark.parametrize("content, match", [("[]", "no records"), ('{"a": 1}', "expected a JSON list"),
                                            ('[{"question": "q"}]', "cannot tell the edit format")])
def test_not_edit_records(tmp_path, content, match):
    with pytest.raises(DataError, match=match):
        load_requests(_write(tmp_path, content))


def test_zsre_mend_probe_without_answer(tmp_path):
    path = _write(tmp_path, [{"src": "q?", "alt": "a", "subject": "s", "loc": "nq question: x"}])
    with pytest.raises(DataError, match=r"bad.json#0: missing field 'loc_ans'"):
        load_requests(path)


def test_explicit_wrong_format_names_missing_field():
    with pytest.raises(DataError, match=r"zsre.json#0: missing field 'concept'"):
        load_requests(ZSRE, format="wikibio")


def test_skip_mode_warns_with_count(tmp_path):
    path = _write(tmp_path, [GOOD, {"prompt": 1}, {**GOOD, "subject": "Z"}, {**GOOD, "target_new": ""}])
    with pytest.warns(UserWarning, match=r"skipped 2 of 4 bad records; first: .*#1.*'subject'"):
        requests = load_requests(path, on_bad_record="skip")
    assert [r.source for r in requests] == ["bad.json#0", "bad.json#2"]
    with pytest.raises(DataError, match="none of its 1 records"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_requests(_write(tmp_path, [{**GOOD, "prompt": 1}]), on_bad_record="skip")


# ----------------------------------------------------------------------------- tokenization


@pytest.mark.parametrize("tokenizer_name", ["bpe_tokenizer", "sp_tokenizer"])
def test_target_tokens_are_exactly_the_target(request, tokenizer_name, zsre):
    tok = request.getfixturevalue(tokenizer_name)
    for r in zsre[:400]:
        enc = encode(tok, r.prompt, r.target_new)
        assert tok.decode(list(enc.target_ids)).strip() == r.target_new, r.source
        if tokenizer_name == "bpe_tokenizer":
            prompt_ids = tok(r.prompt)["input_ids"]
            assert list(enc.input_ids[: len(prompt_ids)]) == prompt_ids
            assert enc.target_start == len(prompt_ids)


def test_merge_across_boundary_keeps_whole_target(sp_tokenizer):
    # The sp fixture has no pre-tokenizer, so "is▁" can merge the separating space into the prompt side and
    # the prompt alone tokenizes differently; the target must still be covered, never lost.
    prompt, target = "The noble title of Eugène-Casimir Villatte is", "count"
    full = sp_tokenizer(prompt + " " + target)["input_ids"]
    assert full[: len(sp_tokenizer(prompt)["input_ids"])] != sp_tokenizer(prompt)["input_ids"]
    enc = encode(sp_tokenizer, prompt, target)
    assert sp_tokenizer.decode(list(enc.target_ids)).strip().endswith(target)


@pytest.mark.parametrize("target", ["", "   "])
def test_empty_target_is_value_error(bpe_tokenizer, target):
    with pytest.raises(ValueError, match="empty target"):
        encode(bpe_tokenizer, "Who wrote X?", target)


# ----------------------------------------------------------------------------- DataModule


def _datamodule(tokenizer, **kwargs) -> SequentialEditDataModule:
    dm = SequentialEditDataModule(str(ZSRE), **{"n_edits": 6, **kwargs})
    dm.set_tokenizer(tokenizer)
    dm.setup("fit")
    return dm


def test_datamodule_streams_edits_in_order(bpe_tokenizer):
    dm = _datamodule(bpe_tokenizer)
    batches = list(dm.train_dataloader())
    assert [b["index"] for b in batches] == list(range(6))
    assert dm.report["format"] == "knowedit" and dm.report["selected"] == 6 and dm.report["records"] == 50
    for b, r in zip(batches, dm.requests, strict=True):
        assert isinstance(b["index"], int) and isinstance(b["target_start"], int)
        assert b["input_ids"].dtype == torch.long and b["input_ids"].dim() == 1
        enc = encode(bpe_tokenizer, r.prompt, r.target_new)
        assert tuple(b["input_ids"].tolist()) == enc.input_ids and b["target_start"] == enc.target_start


def test_datamodule_resumes_at_next_edit(bpe_tokenizer):
    dm = _datamodule(bpe_tokenizer)
    for batch in dm.train_dataloader():
        dm.mark_done(batch["index"])
        if batch["index"] == 2:
            break
    state = dm.state_dict()
    assert state["position"] == 3
    resumed = _datamodule(bpe_tokenizer)
    resumed.load_state_dict(state)
    assert [b["index"] for b in resumed.train_dataloader()] == [3, 4, 5]
    with pytest.raises(ValueError, match="before edit 3"):
        dm.mark_done(5)
    other = _datamodule(bpe_tokenizer, n_edits=4)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match="6 edits, this run selects 4"):
        other.train_dataloader()


def test_datamodule_probe_dataloaders_cover_every_probe(bpe_tokenizer):
    dm = _datamodule(bpe_tokenizer, n_edits=40, eval_batch_size=7)
    for kind in ("rewrite", "rephrase", "portability", "locality"):
        batches = list(dm.probe_dataloader(kind))
        assert all(len(b) <= 7 for b in batches)
        rows = [row for b in batches for row in b]
        assert rows == probe_rows(dm.requests, kind)
        expected = {
            "rewrite": [(i, "rewrite", r.prompt, r.target_new) for i, r in enumerate(dm.requests)],
            "rephrase": [(i, "rephrase", p, r.target_new) for i, r in enumerate(dm.requests) for p in r.rephrase],
        }.get(kind) or [(i, k, p, a[0]) for i, r in enumerate(dm.requests)
                        for k, probes in getattr(r, kind).items() for p, a in probes]
        assert [(x["request"], x["kind"], x["prompt"], x["answer"]) for x in rows] == expected
    kinds = {row["kind"] for b in dm.probe_dataloader("portability") for row in b}
    assert kinds == {"Reasoning", "Subject_Aliasing", "Logical_Generalization"}


def test_datamodule_needs_tokenizer_and_valid_args():
    dm = SequentialEditDataModule(str(ZSRE), n_edits=2)
    dm.setup("fit")  # loading does not need the tokenizer
    with pytest.raises(RuntimeError, match="set_tokenizer"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="sample"):
        SequentialEditDataModule(str(ZSRE), sample="shuffle")
    with pytest.raises(ValueError, match="format must be one of"):
        SequentialEditDataModule(str(ZSRE), format="zsre")


def test_lightning_checkpoint_resume_continues_at_next_edit(bpe_tokenizer, tmp_path):
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[int] = []

        def training_step(self, batch, batch_idx):
            self.seen.append(batch["index"])
            self.trainer.datamodule.mark_done(batch["index"])
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def trainer():
        every_2 = L.pytorch.callbacks.ModelCheckpoint(tmp_path, every_n_train_steps=2, save_top_k=-1)
        return L.Trainer(max_epochs=1, accelerator="cpu", logger=False, callbacks=[every_2],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)

    runs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for ckpt in [None, tmp_path / "epoch=0-step=2.ckpt"]:  # a full run, then a resume from its step-2 checkpoint
            model, dm = Recorder(), SequentialEditDataModule(str(ZSRE), n_edits=5)
            dm.set_tokenizer(bpe_tokenizer)
            trainer().fit(model, datamodule=dm, ckpt_path=ckpt)
            runs.append((model.seen, dm.position))
    assert runs == [([0, 1, 2, 3, 4], 5), ([2, 3, 4], 5)]
