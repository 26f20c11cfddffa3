"""What every benchmark result carries and how it is written: shared by the scripts here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path


def git_commit() -> str:
    """The short commit of this checkout ('' outside git), so each result names its code."""
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         check=False, cwd=Path(__file__).resolve().parent)
    return git.stdout.strip()


def save(result: dict, path: str | Path) -> None:
    """Write the result as JSON and print it as the last line (what `vengine bench` shows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
