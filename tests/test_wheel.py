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


def test_the_extension_is_enabled_from_the_wheel_in_a_venv_with_no_node(wheel, tmp_path):
    # JupyterLab comes from this interpreter's packages (installing it afresh costs half a
    # minute); its extensions are only looked for under the venv, where the wheel puts ours.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed",
                    str(wheel)], check=True)  # into the venv, whatever this interpreter has
    path = str(venv / "bin")  # nothing else: no node, no npm
    assert shutil.which("node", path=path) is None
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("JUPYTER")}  # no other place to find extensions

    listing = subprocess.run([python, "-m", "jupyterlab.labextensions", "list"],
                             env={**env, "PATH": path, "NO_COLOR": "1"},
                             capture_output=True, text=True, check=True)

    text = re.sub(r"\x1b\[[0-9;]*m", "", listing.stdout + listing.stderr)
    assert re.search(r"fedmagic v0\.1\.0 enabled\s+OK \(python, fedmagic\)", text), text
    assert (venv / "share" / "jupyter" / "labextensions" / "fedmagic" / "package.json").is_file()
