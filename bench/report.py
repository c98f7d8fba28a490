"""What every bench script ends with: print its markdown table, write it and its runs as JSON."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def save(name: str, table: str, started: str, **fields) -> Path:
    """Print `table`, then write {started, machine, **fields, table} to bench/results/<name>.json."""
    print(table)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"started": started, "machine": platform.processor() or platform.machine(),
                                **fields, "table": table}, indent=1))
    print(f"written to {path}")
    return path
