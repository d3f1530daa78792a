"""The whole project passes its one linter configuration (`[tool.ruff]` in
pyproject.toml): CI runs this test, so a lint error fails CI."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
  result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                           "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True, cwd=ROOT, check=False)
  assert result.returncode == 0, (
      "ruff check found problems (fix them, or run `ruff check --fix`):\n"
      + result.stdout + result.stderr)
