"""The speed bench drives the package (Policy, run_edit, KDPOEditor as shipped under a plain Trainer): its
smoke run keeps it in step with them. Variant d once crashed on its first GPU run after the editor gained
retention curves, with no CPU run to show it."""
import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import DEMO_ZSRE

ROOT = Path(__file__).resolve().parents[1]


def test_edit_speed_quick_runs_every_variant_and_their_losses_match_the_naive_edit(tmp_path):
    out = tmp_path / "speed.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "bench/edit_speed.py", "--quick", "--data", str(DEMO_ZSRE),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["variants"]) == set("abcd")
    naive = [loss for edit in result["variants"]["a"]["edits"] for loss in edit["losses"]]
    assert len(naive) == 2 * 4 * 8  # 2 edits x 4 cycles x 8 steps, no early stop
    for variant, edits in [*((v, result["variants"][v]["edits"]) for v in "bcd"),
                           ("d-trainer", result["variants"]["d"]["trainer_edits"])]:
        losses = [loss for edit in edits for loss in edit["losses"]]
        assert max(abs(x - y) for x, y in zip(losses, naive, strict=True)) < 1e-6, variant
