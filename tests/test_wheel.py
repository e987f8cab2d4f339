"""The wheel carries the JupyterLab extension prebuilt: installing it needs no Node.js."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel ``.ci/install`` built, else one built now (that needs Node.js)."""
    built = sorted((REPO / "dist").glob("fedmagic-*.whl"))
    if built:
        return built[-1]
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(out),
                    str(REPO)], check=True, capture_output=True)
    return next(out.glob("fedmagic-*.whl"))


def test_the_extension_is_enabled_from_the_wheel_in_a_clean_venv_with_no_node(wheel,
                                                                             tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True)
    subprocess.run([*pip, "jupyterlab>=4.6,<5"], check=True)  # no torch: only the lab side
    path = str(venv / "bin")  # nothing else: no node, no npm
    assert shutil.which("node", path=path) is None

    listing = subprocess.run([str(venv / "bin" / "jupyter"), "labextension", "list"],
                             env={**os.environ, "PATH": path, "NO_COLOR": "1"},
                             capture_output=True, text=True, check=True)

    text = re.sub(r"\x1b\[[0-9;]*m", "", listing.stdout + listing.stderr)
    assert re.search(r"fedmagic v0\.1\.0 enabled\s+OK \(python, fedmagic\)", text), text
    assert (venv / "share" / "jupyter" / "labextensions" / "fedmagic" / "package.json").is_file()
