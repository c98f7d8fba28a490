"""bench/quality.py's table and paired verdict over chosen subsets, checked against means computed here from
results JSONs written in the shape the CLI writes them (per-request values only; no model runs)."""
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality  # noqa: E402


def _write(out: Path, subset: str, method: str, values: dict[str, list[float]]) -> None:
    n = len(next(iter(values.values())))
    requests = [{"index": i, **{key: v[i] for key, v in values.items()}} for i in range(n)]
    (out / f"zsre_{subset}_{method}.json").write_text(json.dumps({"requests": requests}))


@pytest.fixture
def results(tmp_path, monkeypatch) -> dict:
    """Three methods on subsets 0 and 1 of 20 requests, random 0/1 edit success and locality in [0, 1]."""
    monkeypatch.setattr(quality, "OUT", tmp_path)
    rng, made = random.Random(3), {}
    for subset in ("0", "1"):
        for method in ("kdpo", "alphaedit", "memit"):
            values = {"edit_success": [float(rng.random() < 0.5) for _ in range(20)],
                      "locality_mean": [rng.random() for _ in range(20)]}
            _write(tmp_path, subset, method, values)
            made[subset, method] = values
    return made


def test_paired_difference_over_chosen_subsets(results) -> None:
    for only, subsets in ((["0"], ["0"]), (None, ["0", "1"])):
        a = [v for s in subsets for v in results[s, "kdpo"]["edit_success"]]
        b = [v for s in subsets for v in results[s, "alphaedit"]["edit_success"]]
        mean, low, high = quality.paired("zsre", "kdpo", "alphaedit", "edit_success", only=only)
        assert mean == pytest.approx(100 * (sum(a) - sum(b)) / len(a))
        assert low <= mean <= high


def test_table_rows_cover_only_the_chosen_subsets_and_the_verdict_has_a_column_per_baseline(results) -> None:
    rows = [line for line in quality.table(only=["1"]).splitlines() if line.startswith("| zsre | memit")]
    expected = 100 * sum(results["1", "memit"]["edit_success"]) / 20
    cells = rows[0].split(" | ")
    assert len(rows) == 1 and cells[2] == "1 x 20" and cells[3].startswith(f"{expected:.1f} [")
    text = quality.verdict("kdpo", ("alphaedit", "memit"), only=["0"])
    head, _, row = text.splitlines()
    assert head.count("Edit Succ.") == 2 and row.startswith("| zsre | ")
    edit = [quality.paired("zsre", "kdpo", b, "edit_success", only=["0"]) for b in ("alphaedit", "memit")]
    assert row.split(" | ")[1:3] == [f"{m:+.1f} [{lo:+.1f}, {hi:+.1f}]" for m, lo, hi in edit]
