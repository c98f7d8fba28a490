"""bench/lifelong.py: its orderings, and a quick run end to end on a tiny model (2 orderings x 2 methods x
6 edits, a curve point every 3, capability on tests/fixtures) whose table, verdict and plot are checked
against the results JSONs, computed apart."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, full_data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import lifelong  # noqa: E402
import quality  # noqa: E402

TINY = ["--model.target.layer", "2", "--model.edit.lr", "0.005", "--model.edit.n_cycles", "3",
        "--model.edit.n_steps", "4", "--evaluation.fluency", "false", "--evaluation.generation_max_tokens", "6"]


def _bench(tmp_path: Path, model_dir: Path, best: list[str] = ("--best", "kdpo")) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "bench/lifelong.py", "--quick", "--methods", "ftm", "kdpo", *best,
           "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"),
           "--model.name_or_path", str(model_dir), *TINY]
    env = {**os.environ, "KDPO_LIGHTNING_DATA": str(FIXTURES), "HF_HUB_OFFLINE": "1"}  # MMLU, HellaSwag: 3 each
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _mean(values) -> float:
    values = list(values)
    return 100 * sum(values) / len(values)


def test_quick_run_table_verdict_and_plot(tiny_llama_dir, tmp_path):
    first = _bench(tmp_path, tiny_llama_dir)
    out = tmp_path / "results"
    orderings = {o: json.loads((out / "lifelong" / "orderings" / f"{o}.json").read_text()) for o in ("tune", "0", "1")}
    assert [len(orderings[o]) for o in ("tune", "0", "1")] == [10, 6, 6]
    tune_prompts = {r["prompt"] for r in orderings["tune"]}
    assert not tune_prompts & {r["prompt"] for o in ("0", "1") for r in orderings[o]}

    results = {(o, m): json.loads((out / "lifelong" / f"{o}_{m}.json").read_text())
               for o in ("0", "1") for m in ("ftm", "kdpo")}
    for (ordering, method), res in results.items():
        assert res["method"] == method and res["n_edits"] == 6
        assert res["dataset"].endswith(f"orderings/{ordering}.json")
        assert [r["source"] for r in res["requests"]] == [f"{ordering}.json#{i}" for i in range(6)]
        assert [p["edits"] for p in res["curve"]] == [3, 6]
        assert res["curve"][-1]["per_request"]["edit_success"] == [r["edit_success"] for r in res["requests"]]
    assert not any((out / "lifelong" / "checkpoints").iterdir())  # a finished run's checkpoint is gone
    assert len(list((out / "lifelong" / "pre_edit").iterdir())) == 3  # a snapshot per ordering, one capability

    saved = json.loads((out / "lifelong_quick.json").read_text())
    rows = saved["rows"]
    assert list(rows) == ["ftm", "kdpo"]
    for method, row in rows.items():
        runs = [results[o, method] for o in ("0", "1")]
        requests = [r for res in runs for r in res["requests"]]
        for column, key in [*lifelong.PER_REQUEST.items(), ("s / edit", "seconds")]:
            values = [r[key] for r in requests if r.get(key) is not None]
            mean, low, high = row[column]
            expected = _mean(values) / (100 if key == "seconds" else 1)
            assert mean == pytest.approx(expected, abs=1e-9), (method, column)
            assert low - 1e-9 <= mean <= high + 1e-9, (method, column)
        for column, key, source in [("MMLU", "capability/mmlu/acc", "summary"),
                                    ("HellaSwag before", "capability/hellaswag/acc_norm", "capability_before")]:
            per_ordering = [res[source][key] for res in runs]  # one value each: the interval spans them
            assert row[column] == pytest.approx([sum(per_ordering) / 2, min(per_ordering), max(per_ordering)])
        edit = row["Edit Succ."]
        assert f"| {method} | 2 x 6 | {edit[0]:.1f} [{edit[1]:.1f}, {edit[2]:.1f}] |" in saved["table"]

    diffs = {key: [] for key in ("edit_success", "locality_mean")}  # kdpo - ftm, paired by request
    for ordering in ("0", "1"):
        ftm = {r["index"]: r for r in results[ordering, "ftm"]["requests"]}
        for r in results[ordering, "kdpo"]["requests"]:
            for key in diffs:
                diffs[key].append(r[key] - ftm[r["index"]][key])
    facts = saved["verdict"]
    assert facts["edit_success_minus"]["ftm"][0] == pytest.approx(_mean(diffs["edit_success"]), abs=1e-9)
    assert facts["locality_baseline"] == "ftm"
    assert facts["locality_minus"][0] == pytest.approx(_mean(diffs["locality_mean"]), abs=1e-9)
    assert facts["keeps_80"] == (rows["kdpo"]["Edit Succ."][0] >= 80)
    assert facts["missing"] == ["alphaedit"]  # so the answer is no, or undecided when the rest holds
    holds = facts["keeps_80"] and facts["edit_success_minus"]["ftm"][1] > 0 and facts["locality_minus"][2] >= 0
    assert facts["answer"] is (None if holds else False)
    assert "No results for alphaedit" in saved["table"]
    assert (out / "lifelong_quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = _bench(tmp_path, tiny_llama_dir, best=[])  # finished runs are kept, not rerun
    assert "started" in first.stdout and "started" not in again.stdout
    resaved = json.loads((out / "lifelong_quick.json").read_text())
    assert resaved["rows"] == rows and resaved["verdict"] == facts  # no --best: the last verdict is kept


def test_orderings_disjoint_from_tuning_and_a_superset_of_quality_slice():
    full_data("ZsRE/ZsRE-test-all.json")
    parts = lifelong.orderings(lifelong.FULL)
    assert [len(parts[o]) for o in ("tune", "0", "1")] == [200, 500, 500]
    key = lambda r: (r["subject"], r["prompt"])  # noqa: E731
    tune = {key(r) for r in parts["tune"]}
    assert {key(r) for r in quality.subsets("zsre")["tune"]} <= tune
    for ordering in ("0", "1"):
        edits = [key(r) for r in parts[ordering]]
        assert len(set(edits)) == 500 and not tune & set(edits)
    assert [key(r) for r in parts["0"]] != [key(r) for r in parts["1"]]
    assert lifelong.orderings(lifelong.FULL) == parts  # seeded: the same every time
