"""The design card's folders install under one namespace; nothing generic lands at the top level."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ["parallel", "cache", "workers", "ui"]

PROBE = """
import importlib, importlib.util, json, sys
print(json.dumps({
    f: [importlib.import_module("fastgen." + f).__file__, importlib.util.find_spec(f) is not None]
    for f in sys.argv[1:]
}))
"""


def test_folders_install_as_fastgen_subpackages_only(tmp_path):
    # Run outside the checkout, as an installed user would, so the repo root is not on sys.path.
    run = subprocess.run([sys.executable, "-c", PROBE, *FOLDERS], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    for folder in FOLDERS:
        module_file, top_level_importable = found[folder]
        assert Path(module_file).resolve() == ROOT / folder / "__init__.py"
        assert not top_level_importable, f"a top-level '{folder}' module is importable"
