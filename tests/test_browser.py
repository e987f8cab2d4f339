"""The notebook experience in a real browser: JupyterLab 4 in headless Chromium."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import nbformat
import pytest

from conftest import free_port
from test_tutorial import as_fedmagic_script, tutorial_final_code

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ERROR_OUTPUT = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
DOCS = Path(__file__).resolve().parents[1] / "docs"


def browser_is_here() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")


@pytest.fixture(params=["lab", "notebook"])
def jupyter(request, tmp_path):
    """A JupyterLab 4 or Notebook 7 server on 127.0.0.1 with a fresh home and work directory."""
    browser_is_here()
    port, token = free_port(), secrets.token_hex(16)
    home = tmp_path / "jupyter"
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(home / "config"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "FEDMAGIC_PORT": str(free_port())}
    env.pop("FEDMAGIC_TOKEN", None)
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyter", request.param, "--no-browser", "--allow-root",
         "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", "--ServerApp.port_retries=0",
         f"--ServerApp.root_dir={workdir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"jupyter {request.param} did not start within 90 s: "
                            f"{(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)
    try:
        yield Server(request.param, url, token, workdir)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


class Server(NamedTuple):
    app: str
    url: str
    token: str
    workdir: Path

    def open(self, notebook: str) -> str:
        path = "lab/tree" if self.app == "lab" else "notebooks"
        return f"{self.url}/{path}/{notebook}?token={self.token}"


@pytest.fixture
def page(tmp_path, request):
    """A page of headless Chromium; its console errors in ``page.console_errors``.

    A failing test leaves a screenshot of the page in its temporary directory.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 1400})
        page = context.new_page()
        page.console_errors = []
        page.on("console", lambda message: message.type == "error"
                and page.console_errors.append(message.text))
        try:
            yield page
        finally:
            report = getattr(request.node, "rep_call", None)
            if report is None or report.failed:
                page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
                print(f"screenshot of the page: {tmp_path / 'failure.png'}")
            context.close()


def open_notebook(page, url: str) -> None:
    """Open a notebook and wait until its kernel has answered the frontend.

    Both frontends show an idle kernel before one is connected, and silently
    skip cells run then: the kernel's own reply on the websocket is the sign.
    """
    answered: list[bool] = []

    def watch(socket) -> None:
        if "/api/kernels/" in socket.url:
            socket.on("framereceived", lambda frame: "kernel_info_reply" in (
                frame if isinstance(frame, str) else frame.decode("utf-8", "replace"))
                and answered.append(True))

    page.on("websocket", watch)
    page.goto(url)
    deadline = time.monotonic() + 60
    while not answered:
        assert time.monotonic() < deadline, "the notebook's kernel did not answer in 60 s"
        page.wait_for_timeout(100)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']")


def test_the_live_widget_shows_participants_and_a_point_per_round(jupyter, page):
    cell = as_fedmagic_script(tutorial_final_code(), "browser")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext fedmagic"),
        nbformat.v4.new_code_cell("%fedavg_local 3 --task browser"),
        nbformat.v4.new_code_cell("%%fedavg_task\n" + cell)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    nbformat.write(notebook, jupyter.workdir / "author.ipynb")

    open_notebook(page, jupyter.open("author.ipynb"))
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")
    widget = page.wait_for_selector(f".fedmagic-task, {ERROR_OUTPUT}", timeout=120_000)
    errors = page.locator(ERROR_OUTPUT, has_text="Traceback")
    assert errors.count() == 0, errors.first.inner_text()
    page.wait_for_function(
        "() => document.querySelectorAll('.fedmagic-participants tr').length == 4",
        timeout=120_000)
    page.wait_for_function(
        "() => (document.querySelector('.fedmagic-task .widget-html-content') || {})"
        ".textContent?.includes('finished')", timeout=180_000)

    rows = page.inner_text(".fedmagic-participants")
    assert all(f"node-{i}" in rows for i in (1, 2, 3))
    assert page.locator(".fedmagic-task .bqplot").count() == 3
    assert not [error for error in page.console_errors if "fedmagic" in error.lower()]
    if jupyter.app == "lab":
        DOCS.mkdir(exist_ok=True)
        widget.scroll_into_view_if_needed()
        page.mouse.move(0, 0)  # no chart toolbar over the titles
        page.wait_for_timeout(500)
        widget.screenshot(path=str(DOCS / "widget.png"))
