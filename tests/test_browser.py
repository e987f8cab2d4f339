"""The notebook experience in a real browser: JupyterLab 4 in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator, NamedTuple

import nbformat
import pytest

from conftest import free_port
from fedmagic.examples.digits_task import DigitsScheduler
from fedmagic.engine.launch import start_task
from test_tutorial import as_fedmagic_script, tutorial_final_code

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ERROR_OUTPUT = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
DOCS = Path(__file__).resolve().parents[1] / "docs"
NOTEBOOKS = DOCS.parent / "notebooks"


def browser_is_here() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")


class Server(NamedTuple):
    app: str
    url: str
    token: str
    workdir: Path

    def open(self, notebook: str) -> str:
        path = "lab/tree" if self.app == "lab" else "notebooks"
        return f"{self.url}/{path}/{notebook}?token={self.token}"


@contextlib.contextmanager
def serve(app: str, tmp_path: Path) -> Iterator[Server]:
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
        [sys.executable, "-m", "jupyter", app, "--no-browser", "--allow-root",
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
                pytest.fail(f"jupyter {app} did not start within 90 s: "
                            f"{(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)
    try:
        yield Server(app, url, token, workdir)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:  # stuck shutting a kernel down: the test is over
            server.kill()
            server.wait(timeout=10)
        log.close()


@pytest.fixture
def jupyterlab(tmp_path):
    with serve("lab", tmp_path) as server:
        yield server


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


def run_all_cells(page) -> None:
    page.click(".lm-MenuBar-itemLabel:text-is('Run')")
    page.click(".lm-Menu-itemLabel:text-is('Run All Cells')")


def wait_without_tracebacks(page, selector: str, timeout: float = 120_000):
    """Wait for ``selector``; fail at once, with the traceback, if a cell raises first."""
    found = page.wait_for_selector(f"{selector}, {ERROR_OUTPUT}", timeout=timeout)
    errors = page.locator(ERROR_OUTPUT, has_text="Traceback")
    assert errors.count() == 0, errors.first.inner_text()
    return found


def wait_for_widget(page, participants: int):
    """The live widget, once its table has a row per participant."""
    widget = wait_without_tracebacks(page, ".fedmagic-task")
    page.wait_for_function(
        f"() => document.querySelectorAll('.fedmagic-participants tr').length == "
        f"{participants + 1}", timeout=120_000)
    return widget


def test_the_tutorials_code_shows_the_live_widget_in_jupyterlab(jupyterlab, page):
    cell = as_fedmagic_script(tutorial_final_code(), "browser")
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext fedmagic"),
        nbformat.v4.new_code_cell("%fedavg_local 3 --task browser"),
        nbformat.v4.new_code_cell("%%fedavg_task\n" + cell)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    nbformat.write(notebook, jupyterlab.workdir / "author.ipynb")

    open_notebook(page, jupyterlab.open("author.ipynb"))
    run_all_cells(page)
    widget = wait_for_widget(page, participants=3)
    page.wait_for_function(
        "() => (document.querySelector('.fedmagic-task .widget-html-content') || {})"
        ".textContent?.includes('finished')", timeout=180_000)

    rows = page.inner_text(".fedmagic-participants")
    assert all(f"node-{i}" in rows for i in (1, 2, 3))
    assert page.locator(".fedmagic-task .bqplot").count() == 3
    assert page.console_errors == []
    widget.scroll_into_view_if_needed()
    page.mouse.move(0, 0)  # no chart toolbar over the titles
    page.wait_for_timeout(500)
    widget.screenshot(path=str(DOCS / "widget.png"))


# The status bar leaves "| Idle" while the kernel restarts and comes back to it after.
WATCH_RESTART = """() => {
    const bar = document.querySelector('.jp-StatusBar-Widget');
    window.fedmagicRestart = 'asked';
    new MutationObserver(() => {
        const idle = bar.textContent.includes('| Idle');
        if (!idle) window.fedmagicRestart = 'restarting';
        else if (window.fedmagicRestart === 'restarting') window.fedmagicRestart = 'done';
    }).observe(bar, {subtree: true, childList: true, characterData: true});
}"""
CHART_POINTS = ("document.querySelector('.fedmagic-task .bqplot')"
                "?.querySelectorAll('.dot').length ?? 0")


def test_the_quickstart_runs_with_the_federation_panel_following_its_task(jupyterlab, page):
    shutil.copy(NOTEBOOKS / "en" / "quickstart.ipynb", jupyterlab.workdir)

    open_notebook(page, jupyterlab.open("quickstart.ipynb"))
    page.click("li.lm-TabBar-tab[data-id='fedmagic-federation']")
    page.wait_for_selector(".fedmagic-FederationPanel:has-text('has not loaded fedmagic')")
    run_all_cells(page)
    wait_for_widget(page, participants=3)
    page.wait_for_function(f"() => ({CHART_POINTS}) >= 1", timeout=120_000)
    first = page.evaluate(f"() => {CHART_POINTS}")
    page.wait_for_function(f"() => ({CHART_POINTS}) > {first}", timeout=120_000)
    card = page.wait_for_selector(
        ".fedmagic-FederationPanel section[data-task-id='quickstart']")
    running = card.inner_text()
    page.locator(".fedmagic-task").scroll_into_view_if_needed()
    page.screenshot(path=str(DOCS / "federation-panel.png"))
    page.click(".fedmagic-FederationPanel button:has-text('Stop after this round')")
    page.wait_for_selector(".fedmagic-FederationPanel section.fedmagic-status-finished",
                           timeout=180_000)
    finished = card.inner_text()

    assert "participants" in running and "fedmagic join ws://127.0.0.1:" in running
    assert "3 (3 " in finished and "accuracy" in finished
    rounds = int(re.search(r"round\s*(\d+) / 5", finished).group(1))
    assert 2 <= rounds < 5  # stopped after the round it was in, checkpoint kept
    assert page.console_errors == []


def test_verify_data_in_a_participant_notebooks_toolbar(jupyterlab, page, federation,
                                                        monkeypatch):
    layout = federation.write_digits(1)
    monkeypatch.chdir(layout.initiator.workdir)
    author = start_task(DigitsScheduler(min_clients=1, max_clients=1, name="demo_task",
                                        max_rounds=2), "toolbar", join_timeout=120)
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext fedmagic"),
        nbformat.v4.new_code_cell(
            f"%fedavg_join {federation.url} --task toolbar --token {federation.token} "
            f"--node hospital-a --data-root {layout.nodes[0].workdir}")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    notebook.metadata["fedmagic"] = {"role": "participant"}
    nbformat.write(notebook, jupyterlab.workdir / "owner.ipynb")

    open_notebook(page, jupyterlab.open("owner.ipynb"))
    button = page.wait_for_selector(".fedmagic-verify-button")  # fedmagic metadata: shown
    run_all_cells(page)
    wait_without_tracebacks(
        page, ".fedmagic-participant button:not([disabled]):has-text('Accept and join')")
    button.click()
    toast = page.wait_for_selector(".Toastify__toast:has-text('data verified')")
    page.wait_for_function(  # until it has slid in
        "() => document.querySelector('.Toastify__toast').getBoundingClientRect().right"
        " <= window.innerWidth")
    verified = toast.inner_text()
    page.screenshot(path=str(DOCS / "verify-data.png"))
    page.click(".fedmagic-participant button:has-text('Accept and join')")
    result = author.wait(180)
    page.keyboard.press("Control+Shift+C")  # the command palette
    page.fill(".lm-CommandPalette-input", "federat")
    commands = page.inner_text(".lm-CommandPalette-content")  # the enabled ones
    page.click(".lm-CommandPalette-item:has-text('Show the Federation Panel')")
    card = page.wait_for_selector(
        ".fedmagic-FederationPanel section.fedmagic-JoinCard.fedmagic-status-ended")
    ended = card.inner_text()
    page.click(".lm-MenuBar-itemLabel:text-is('Kernel')")
    page.click(".lm-Menu-itemLabel:text-is('Restart Kernel…')")
    page.evaluate(WATCH_RESTART)
    page.click(".jp-Dialog-button.jp-mod-accept")
    page.wait_for_selector(".fedmagic-FederationPanel:has-text('has not loaded fedmagic')")
    page.wait_for_function("() => window.fedmagicRestart === 'done'", timeout=60_000)

    assert "hospital-a in task toolbar: data verified" in verified
    assert result.rounds == 2 and result.participants["hospital-a"].status == "uploaded"
    assert "Verify Data of the Joined Tasks" in commands
    assert "Stop This Notebook's Federated Tasks" not in commands  # it authors no task
    assert "passed" in ended and "accepted" in ended  # then forgotten with the kernel
    assert page.console_errors == []


def test_the_quickstart_renders_its_live_widget_in_notebook_7(tmp_path, page):
    with serve("notebook", tmp_path) as notebook7:
        shutil.copy(NOTEBOOKS / "en" / "quickstart.ipynb", notebook7.workdir)

        open_notebook(page, notebook7.open("quickstart.ipynb"))
        run_all_cells(page)
        wait_for_widget(page, participants=3)
        page.wait_for_function(f"() => ({CHART_POINTS}) >= 2", timeout=180_000)
        charts = page.locator(".fedmagic-task .bqplot").count()
        errors = list(page.console_errors)  # before the server stops under the page

    assert charts == 2  # loss and accuracy
    assert errors == []
