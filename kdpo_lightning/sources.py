"""Where edit data comes from: a file, or a named data set found on a search path.

`data.path` is either a JSON file or a name: `demo/zsre` (bundled with the package) or a KnowEdit
or KDPO-paper set such as `knowedit/zsre`, looked up in order in each folder of
$KDPO_LIGHTNING_DATA, `../shared/data` beside the checkout, and ~/.cache/kdpo_lightning/data.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

DEMO = Path(__file__).resolve().parent / "demo"
NAMES = {  # name -> path under a data folder (KnowEdit's own layout)
    "knowedit/zsre": "ZsRE/ZsRE-test-all.json",
    "knowedit/wiki_recent": "wiki_recent/recent_train.json",
    "knowedit/wiki_counterfact": "wiki_counterfact/train_cf.json",
    "knowedit/wikibio": "WikiBio/wikibio-test-all.json",
    "kdpo/zsre": "KDPO_seq/benchmark_ZsRE_ZsRE-test-all_seq.json",
    "kdpo/wikibio": "KDPO_seq/benchmark_WikiBio_wikibio-test-all_seq.json",
    "general/mmlu": "general/mmlu/mmlu_test.jsonl",
    "general/hellaswag": "general/hellaswag/hellaswag_validation.jsonl",
    "general/piqa": "general/piqa/piqa_validation.jsonl",
    "general/winogrande": "general/winogrande/winogrande_xl_validation.jsonl",
}
BUNDLED = {"demo/zsre": DEMO / "zsre.json"}
WHERE_TO_GET = (
    "Get the KnowEdit data set with `kdpo-lightning prepare-data knowedit` (from zjunlp/KnowEdit on the Hugging "
    "Face hub into the last of those places), or from EasyEdit's data release (github.com/zjunlp/EasyEdit, "
    "'Datasets'), and put it, keeping its folders, in one of those places or in a folder named by "
    "$KDPO_LIGHTNING_DATA; or set data.path to the file itself."
)
WHERE_TO_GET_GENERAL = (
    "Export the benchmark from the Hugging Face hub (cais/mmlu test, Rowan/hellaswag validation, ybisk/piqa "
    "validation, allenai/winogrande winogrande_xl validation) as JSON lines to that path under one of those "
    "places, or under a folder named by $KDPO_LIGHTNING_DATA."
)


def data_dirs() -> list[Path]:
    """The search path for named data sets, in order."""
    env = [Path(p).expanduser() for p in os.environ.get("KDPO_LIGHTNING_DATA", "").split(os.pathsep) if p]
    from .models import cache_root

    return [*env, Path(__file__).resolve().parents[2] / "shared" / "data", cache_root() / "data"]


def find_data(path: str | os.PathLike) -> Path:
    """The file behind `path`: a bundled file, else the first match of a name on the search path,
    else `path` itself (a file name). An unknown name (`knowedit/zsree`) is an error listing the names."""
    name = str(path)
    if name in BUNDLED:
        return BUNDLED[name]
    relative = NAMES.get(name)
    if relative is None:
        if _looks_like_name(name):
            raise FileNotFoundError(_unknown_name(name))
        return Path(path)
    tried = [folder / relative for folder in data_dirs()]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    looked = "\n".join(f"  - {c}" for c in tried)
    how = WHERE_TO_GET_GENERAL if name.startswith("general/") else WHERE_TO_GET
    raise FileNotFoundError(f"data set {name!r} ({relative}) not found. Looked in:\n{looked}\n{how}")


def _looks_like_name(path: str) -> bool:
    """True for `set/variant` written like a data name: a `/`, no suffix, not an absolute or home-relative
    path, and no file or folder of that name."""
    return ("/" in path and not Path(path).suffix and not path.startswith(("/", ".", "~"))
            and not Path(path).exists())


def _unknown_name(name: str) -> str:
    """The error for a name that is not a known data set: the known names, closest first, and where names
    are looked up."""
    known = difflib.get_close_matches(name, [*BUNDLED, *NAMES], n=len(BUNDLED) + len(NAMES), cutoff=0)
    folders = "\n".join(f"  - {folder}" for folder in data_dirs())
    return (f"data set {name!r} is not a known name, and no file or folder has that path "
            f"({Path(name).resolve()}).\nKnown names, closest first: {', '.join(known)}\n"
            f"Named data sets are looked up in:\n{folders}\nA file path keeps its suffix (data.path: my/edits.json).")
