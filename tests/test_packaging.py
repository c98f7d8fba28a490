"""The README's commands are the ones CI and users run."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_ci_runs_exactly_the_readme_test_command():
    main_cmd, test_cmd = _readme_commands()
    assert test_cmd.endswith("python -m pytest -q") and main_cmd.endswith("kdpo-lightning fit --config configs/demo.yaml")
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_torch_is_installed_first_and_left_loose_in_pyproject():
    for cmd in _readme_commands():
        assert cmd.index("pip install -q torch==2.13.0") < cmd.index("pip install -q -e")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [d for d in deps if re.match(r"torch\s*(>|=|<|$)", d)]
    assert "==" not in torch_dep and "<" not in torch_dep


def test_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"kdpo-lightning": "kdpo_lightning.cli:main"}
