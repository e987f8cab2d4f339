"""The notebook experience in a real browser: JupyterLab 4 and Notebook 7, light and dark,
in headless Chromium. The screenshots the README shows come from here."""

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

from conftest import START_TIMEOUT, free_port
from fedmagic.examples.digits_task import DigitsScheduler
from fedmagic.engine.launch import start_task

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ERROR_OUTPUT = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}
START_MS = START_TIMEOUT * 1000  # for a process to start (Chromium, a kernel), in playwright's ms
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
        """The notebook's URL; in JupyterLab, with no earlier test's tabs restored."""
        if self.app == "lab":
            return f"{self.url}/lab/tree/{notebook}?token={self.token}&reset"
        return f"{self.url}/notebooks/{notebook}?token={self.token}"


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


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory):
    """One JupyterLab for the tests that each open a notebook of their own in it."""
    with serve("lab", tmp_path_factory.mktemp("jupyterlab")) as server:
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
            args=CHROMIUM_FLAGS, viewport={"width": 1280, "height": 1400},
            timeout=START_MS)  # not playwright's 30 s for a browser to start under load
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
    deadline = time.monotonic() + START_TIMEOUT  # the kernel's process starts meanwhile
    while not answered:
        assert time.monotonic() < deadline, \
            f"the notebook's kernel did not answer in {START_TIMEOUT:g} s"
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


# WCAG's contrast ratio of an element's text against the first opaque background behind it.
CONTRAST = """element => {
    const channels = colour => colour.match(/[\\d.]+/g).map(Number);
    const luminance = colour => {
        const [r, g, b] = channels(colour).slice(0, 3).map(v => {
            v /= 255;
            return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
        });
        return 0.2126 * r + 0.7152 * g + 0.0722 * b;
    };
    let node = element, background = 'rgb(255, 255, 255)';
    while (node) {
        const colour = getComputedStyle(node).backgroundColor;
        const alpha = channels(colour)[3];
        if (alpha === undefined || alpha > 0.5) { background = colour; break; }
        node = node.parentElement;
    }
    const [light, dark] = [luminance(getComputedStyle(element).color), luminance(background)]
        .sort((a, b) => b - a);
    return (light + 0.05) / (dark + 0.05);
}"""
# Every element that shows text of its own, outside charts (SVG) and native controls.
TEXT_ELEMENTS = """root => [...root.querySelectorAll('*')].filter(e =>
    !(e instanceof SVGElement) && e.offsetParent !== null &&
    [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim()))"""


def poor_contrast(page, root: str, least: float = 4.5) -> list[str]:
    """The texts under ``root`` that read at less than ``least``:1 against their background."""
    found = page.evaluate(f"""root => {{
        const contrast = {CONTRAST};
        return ({TEXT_ELEMENTS})(document.querySelector(root))
            .map(e => [e.textContent.trim().slice(0, 40), contrast(e)])
            .filter(([, ratio]) => ratio < {least})
            .map(([text, ratio]) => `${{text}}: ${{ratio.toFixed(2)}}`);
    }}""", root)
    return found


def x_ticks(page) -> list[list[str]]:
    """Each chart's round-axis tick labels."""
    return page.evaluate("""() => [...document.querySelectorAll('.fedmagic-task .bqplot')]
        .map(chart => [...chart.querySelector('.axis').querySelectorAll('.tick text')]
        .map(t => t.textContent))""")


def newest_log_line_is_in_view(page) -> bool:
    return page.evaluate("""() => {
        const log = document.querySelector('.fedmagic-task .fm-log');
        const lines = [...log.querySelectorAll('.fm-line')];
        const newest = lines.reduce((a, b) =>
            a.getBoundingClientRect().top > b.getBoundingClientRect().top ? a : b);
        const box = log.getBoundingClientRect(), line = newest.getBoundingClientRect();
        return line.top >= box.top - 1 && line.bottom <= box.bottom + 1 &&
            newest.textContent.includes("ended");
    }""")


def switch_theme(page, theme: str) -> None:
    """Settings → Theme, as a user switches it (JupyterLab and Notebook 7 alike)."""
    page.click(".lm-MenuBar-itemLabel:text-is('Settings')")
    page.hover(".lm-Menu-itemLabel:text-is('Theme')")
    page.click(f".lm-Menu-itemLabel:text-is('{THEMES[theme]}')")
    light = "true" if theme == "light" else "false"
    page.wait_for_selector(f"body[data-jp-theme-light='{light}']", state="attached")
    page.mouse.move(0, 0)
    page.wait_for_timeout(500)  # the stylesheets swap


def in_each_theme(page, picture: str, *parts: str,
                  widget: str = ".fedmagic-task") -> dict[str, list[str]]:
    """Light, then dark: the ``widget``'s picture as ``docs/<picture>-<theme>.png``, and the
    texts under ``parts`` that read below 4.5:1 contrast, by theme."""
    unreadable = {}
    for theme in THEMES:
        if theme != "light":
            switch_theme(page, theme)
        shown = page.locator(widget)
        shown.scroll_into_view_if_needed()
        page.mouse.move(0, 0)  # no tooltip or chart toolbar in the picture
        page.wait_for_timeout(500)
        shown.screenshot(path=str(DOCS / f"{picture}-{theme}.png"))
        unreadable[theme] = [text for part in parts for text in poor_contrast(page, part)]
    return unreadable


def test_the_quickstart_in_jupyterlab_with_its_widget_and_the_federation_panel(tmp_path, page):
    with serve("lab", tmp_path) as lab:
        shutil.copy(NOTEBOOKS / "en" / "quickstart.ipynb", lab.workdir)
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=lab.url)

        open_notebook(page, lab.open("quickstart.ipynb"))
        page.click("li.lm-TabBar-tab[data-id='fedmagic-federation']")
        page.wait_for_selector(".fedmagic-FederationPanel:has-text('has not loaded fedmagic')")
        run_all_cells(page)
        wait_for_widget(page, participants=3)
        running = page.wait_for_selector(
            "section.fedmagic-TaskCard[data-task-id='quickstart'][data-status='running'] "
            ".fedmagic-status-line:has-text('elapsed')", timeout=120_000).inner_text()
        header = page.inner_text(".fedmagic-task .fm-status")
        page.click(".fedmagic-task .fm-copy")
        copied = page.evaluate("() => navigator.clipboard.readText()")
        shown = page.inner_text("body")
        page.locator(".fedmagic-task").scroll_into_view_if_needed()
        page.screenshot(path=str(DOCS / "federation-panel-light.png"))
        page.wait_for_selector(".fedmagic-task .fm-summary", timeout=180_000)
        card = page.wait_for_selector(
            "section.fedmagic-TaskCard[data-task-id='quickstart'][data-status='finished']")
        folded = card.get_attribute("data-collapsed")
        card.query_selector(".fedmagic-card-toggle").click()
        checkpoint = card.query_selector("code.fedmagic-checkpoint").inner_text()
        ticks = x_ticks(page)
        # the topmost dot of round 1 takes the hover: the initiator's or, where participants
        # evaluate too, the federated one at the same point
        page.hover(".fedmagic-task .bqplot .dot >> nth=0", force=True)
        tooltip = page.wait_for_selector(".bqplot_mark_tooltip:visible").inner_text()
        summary = page.inner_text(".fedmagic-task .fm-summary")
        log_in_view = newest_log_line_is_in_view(page)
        stop_buttons = page.locator(".fedmagic-task button:has-text('Stop')").count()
        verify = page.locator(".fedmagic-verify-button")
        verify_hidden = verify.count() == 0 or "lm-mod-hidden" in (
            verify.first.get_attribute("class") or "")
        unreadable = in_each_theme(page, "widget", ".fedmagic-task", ".fedmagic-FederationPanel")
        page.screenshot(path=str(DOCS / "federation-panel-dark.png"))
        errors = list(page.console_errors)

    # While it ran: where it stood and how long it would take; the join line to share
    assert re.search(r"round \d/5 · \d:\d\d elapsed", header), header
    assert re.search(r"round \d/5 · \d:\d\d elapsed", running), running
    token = re.search(r"--token (\S+)", copied).group(1)
    assert copied.startswith("fedmagic join ws://127.0.0.1:") and "•" not in token
    assert token not in shown  # masked on the page
    # Once it ended: a summary instead of Stop, integer rounds, values on hover
    assert "Finished all 5 rounds" in summary and "models/demo_task" in summary
    assert re.search(r"best accuracy\s+\d+\.\d%", summary), summary
    assert stop_buttons == 0
    assert ticks == [["1", "2", "3", "4", "5"]] * 2
    assert "round" in tooltip and "1" in tooltip
    assert log_in_view  # the newest line shows without scrolling
    # The Federation panel: the ended card folded, its checkpoint one click away
    assert folded == "true" and checkpoint.endswith("models/demo_task")
    assert verify_hidden  # an author's notebook has nothing to verify
    # Readable in both themes: every text at 4.5:1 or better
    assert unreadable == {"light": [], "dark": []}
    assert errors == []


# The epsilon chart of the widget: its points and its round axis's labels; null if none.
EPSILON_CHART = """() => {
    const chart = [...document.querySelectorAll('.fedmagic-task .bqplot')].find(figure =>
        figure.querySelector('.mainheading')?.textContent === 'epsilon spent');
    return chart ? {points: chart.querySelectorAll('.dot').length,
        rounds: [...chart.querySelector('.axis').querySelectorAll('.tick text')]
            .map(t => t.textContent)} : null;
}"""


def epsilon_chart(page, points: int) -> dict | None:
    """The epsilon chart, once it has ``points`` points (or, after 30 s, as it is)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):  # bqplot draws a moment after the data comes
        page.wait_for_function(f"() => ({EPSILON_CHART})()?.points === {points}",
                               timeout=30_000)
    return page.evaluate(EPSILON_CHART)


def card_rows(page, card: str) -> dict[str, str]:
    """The rows of a Federation panel's card, by name: ``{'budget': 'ε 1.23 of ...'}``."""
    return page.evaluate("""card => Object.fromEntries([...document.querySelector(card)
        .querySelectorAll('.fedmagic-row')].map(row => [row.dataset.row,
        row.querySelector('.fedmagic-value').innerText]))""", card)


def words(text: str) -> str:
    """``text`` with its white space as one reads it: single spaces."""
    return " ".join(text.split())


def test_a_secure_task_with_distributed_privacy_shows_its_budget_and_guarantees_in_jupyterlab(
        tmp_path, page):
    from opacus.accountants import RDPAccountant

    quickstart = nbformat.read(NOTEBOOKS / "en" / "quickstart.ipynb", as_version=4)
    task = next(cell.source for cell in quickstart.cells
                if cell.source.startswith("%%fedavg_task"))
    launch = "scheduler = QuickstartScheduler("
    assert launch in task, "the quickstart's task cell no longer builds a QuickstartScheduler"
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext fedmagic"),
        nbformat.v4.new_code_cell("participants = %fedavg_local 3 --task private-digits"),
        nbformat.v4.new_code_cell(  # the quickstart's task, 3 rounds, under distributed DP
            task[:task.index(launch)] +
            "from fedmagic.strategies import DifferentialPrivacy, FedAvg, SecureAggregation\n"
            "\n"
            "# epsilon 9.01 after 3 rounds of z=1: the target of 50 stops none of them\n"
            "private = SecureAggregation(DifferentialPrivacy(\n"
            "    FedAvg(), clip=0.1, noise_multiplier=1.0, target_epsilon=50.0))\n"
            "scheduler = QuickstartScheduler(min_clients=3, max_clients=3, name='demo_task',\n"
            "                                max_rounds=3)\n"
            "scheduler.launch_task(task_id='private-digits', strategy=private)")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    accountant = RDPAccountant()  # Opacus's own count of 3 rounds: all drawn, z=1
    for _ in range(3):
        accountant.step(noise_multiplier=1.0, sample_rate=1.0)
    epsilon = accountant.get_epsilon(delta=1e-5)
    card = "section.fedmagic-TaskCard[data-task-id='private-digits']"

    with serve("lab", tmp_path) as lab:
        nbformat.write(notebook, lab.workdir / "private.ipynb")

        open_notebook(page, lab.open("private.ipynb"))
        page.click("li.lm-TabBar-tab[data-id='fedmagic-federation']")
        run_all_cells(page)
        # three participant kernels start and import torch before the widget's first round
        wait_without_tracebacks(page, ".fedmagic-task", timeout=START_MS)
        page.wait_for_selector(".fedmagic-task .fm-summary", timeout=START_MS + 180_000)
        summary = page.inner_text(".fedmagic-task .fm-summary")
        budget = page.locator(".fedmagic-task .fm-head .fm-budget").all_inner_texts()
        guarantees = [words(line) for line in
                      page.locator(".fedmagic-task .fm-guarantee").all_inner_texts()]
        chart = epsilon_chart(page, points=3)
        page.wait_for_selector(f"{card}[data-status='finished']", timeout=30_000)
        page.click(f"{card} .fedmagic-card-toggle")  # an ended card starts folded
        page.click(f"{card} [data-row='privacy'] summary")  # the lines past the first
        privacy_rows = page.inner_text(f"{card} [data-row='privacy'] pre").splitlines()
        rows = card_rows(page, card)
        # tall enough that the picture holds the whole widget, down to its epsilon chart
        page.set_viewport_size({"width": 1280, "height": 2400})
        unreadable = in_each_theme(page, "privacy", ".fedmagic-task", ".fedmagic-FederationPanel")
        errors = list(page.console_errors)

    spent = f"ε {epsilon:.3g} of 50 spent at δ 1e-05"
    seen = "seen: only the sum of 3 masked updates (t=2)"
    secure = ("secure aggregation (SecAgg+): the initiator and the relay see each round's sum "
              "of the updates, never one update, and only with at least t (a majority of each "
              "node's neighbours and itself, e.g. 3 of 5) in it; updates quantised to 16 bits")
    private = ("differential privacy: epsilon at most 50 at delta 1e-05 (each update clipped "
               "to L2 norm 0.1, each participant drawn with probability 1 a round, Gaussian "
               "noise of 1 x 0.1 on the sum, added by the participants before masking, each "
               "its share (distributed))")
    assert "Finished all 3 rounds" in summary, summary  # the budget stopped no round
    # The widget's header: the budget spent, what the initiator saw, both guarantees
    assert budget == [spent, seen], budget
    assert guarantees == [f"privacy {secure}", f"privacy {private}"], guarantees
    assert chart == {"points": 3, "rounds": ["1", "2", "3"]}, chart
    # The Federation panel's card says the same
    assert (rows.get("budget"), rows.get("secure")) == (spent, seen), rows
    assert privacy_rows == [secure, private], privacy_rows
    # Readable in both themes: every text at 4.5:1 or better
    assert unreadable == {"light": [], "dark": []}
    assert errors == []


def test_fedavg_simulate_shows_a_thousand_virtual_participants_summed_up_in_jupyterlab(
        tmp_path, page):
    quickstart = nbformat.read(NOTEBOOKS / "en" / "quickstart.ipynb", as_version=4)
    task = next(cell.source for cell in quickstart.cells
                if cell.source.startswith("%%fedavg_task"))
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(  # the author holds the digits this time: all of them
            "import os\n"
            "from fedmagic.digits import write_partitions\n"
            "(whole,) = write_partitions('digits', 1, data_dir='demo_task/data').nodes\n"
            "os.chdir(whole.workdir)"),
        nbformat.v4.new_code_cell("%load_ext fedmagic"),
        nbformat.v4.new_code_cell(task),  # the real task: it waits for data owners
        nbformat.v4.new_code_cell(
            "%fedavg_simulate 1000 --partition dirichlet --alpha 0.3 --workers 2")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    simulated = ".jp-Cell:last-child .fedmagic-task"

    with serve("lab", tmp_path) as lab:
        nbformat.write(notebook, lab.workdir / "simulate.ipynb")
        open_notebook(page, lab.open("simulate.ipynb"))
        page.click("li.lm-TabBar-tab[data-id='fedmagic-federation']")
        run_all_cells(page)
        wait_without_tracebacks(page, f"{simulated} .fedmagic-simulated", timeout=START_MS)
        # mid-round: the bar counts participants done out of those selected, as they come
        page.wait_for_selector(f"{simulated} .fedmagic-simulated [role='progressbar']"
                               ".fm-running:not([aria-valuenow='0'])", timeout=START_MS)
        page.wait_for_selector(f"{simulated} .fm-summary", timeout=START_MS + 180_000)
        view = page.inner_text(f"{simulated} .fedmagic-simulated")
        title = page.inner_text(f"{simulated} .fm-title")
        bar = page.locator(f"{simulated} .fedmagic-simulated [role='progressbar']")
        done, selected = bar.get_attribute("aria-valuenow"), bar.get_attribute("aria-valuemax")
        bars = page.locator(f"{simulated} .fm-histogram > span").count()
        rows = page.locator(f"{simulated} .fedmagic-participants tr").count()
        summary = page.inner_text(f"{simulated} .fm-summary")
        card = "section.fedmagic-TaskCard[data-task-id='quickstart (simulated)']"
        page.wait_for_selector(f"{card}[data-status='finished']", timeout=30_000)
        page.click(f"{card} .fedmagic-card-toggle")  # an ended card starts folded
        in_panel = card_rows(page, card)
        join_lines = page.locator(f"{card} .fedmagic-join-line").count()
        page.locator(simulated).scroll_into_view_if_needed()
        unreadable = in_each_theme(page, "simulation", simulated, widget=simulated)
        errors = list(page.console_errors)

    assert view.startswith("1,000 virtual participants · dirichlet (alpha 0.3) · on dask, "
                           "2 workers"), view
    assert (done, selected) == ("1000", "1000")  # every one accounted for, the last round
    assert re.search(r"round 5: 1,000 / 1,000 done\s+uploaded [\d,]+\s+refused [\d,]+", view), \
        view  # Dirichlet(0.3) leaves some shares empty: refused, not trained
    assert re.search(r"slowest virtual-\d+ \d\.\d\d s", view), view
    assert title == "simulation of task quickstart"
    assert re.search(r"[\d,]+ left out: its share of the training set is empty, so it has "
                     r"nothing to train on \(virtual-\d+, virtual-\d+, virtual-\d+ and [\d,]+ "
                     r"more\)", view), view
    assert "samples each" in view and "train seconds each" in view and bars >= 2
    assert rows == 0  # no table of a thousand rows
    assert "Finished all 5 rounds" in summary and "models/demo_task-simulated" in summary
    # The Federation panel: a card of its own beside the real task's, with no join line
    assert re.fullmatch(r"1,000 virtual \(dirichlet \(alpha 0.3\)\) on dask: round 5, "
                        r"[\d,]+ uploaded, [\d,]+ refused", in_panel["participants"]), in_panel
    assert join_lines == 0
    assert unreadable == {"light": [], "dark": []}
    assert errors == []


def test_stop_in_the_federation_panel_ends_a_task_still_waiting_for_participants(
        jupyterlab, page):
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext fedmagic"),
        nbformat.v4.new_code_cell(
            "%%fedavg_task\n"
            "from fedmagic.examples.digits_task import DigitsScheduler\n"
            "DigitsScheduler(min_clients=2, max_clients=2, max_rounds=3)"
            ".launch_task(task_id='alone')")])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    nbformat.write(notebook, jupyterlab.workdir / "alone.ipynb")

    open_notebook(page, jupyterlab.open("alone.ipynb"))
    page.click("li.lm-TabBar-tab[data-id='fedmagic-federation']")
    run_all_cells(page)
    wait_without_tracebacks(page, ".fedmagic-task .fm-log:has-text('waiting for 2')")
    page.click("section.fedmagic-TaskCard[data-task-id='alone'] button.fedmagic-stop-task")
    started = time.monotonic()
    page.wait_for_selector(
        "section.fedmagic-TaskCard[data-task-id='alone'][data-status='finished']",
        timeout=30_000)
    stopped_after = time.monotonic() - started
    summary = page.wait_for_selector(".fedmagic-task .fm-summary").inner_text()

    assert stopped_after < 10  # not the 300 s join timeout
    assert "before round 1" in summary, summary
    assert page.console_errors == []


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
    # The author launches again with one argument changed; the owner looks, and declines
    changed = start_task(DigitsScheduler(min_clients=1, max_clients=1, name="demo_task",
                                         max_rounds=4), "toolbar", join_timeout=120)
    try:
        page.click(".fedmagic-participant button:has-text('Join again')")
        page.click(".fedmagic-participant button:not([disabled]):has-text('Decline')")
        declined = page.wait_for_selector(
            ".fedmagic-FederationPanel section.fedmagic-JoinCard[data-consent='declined']"
            ".fedmagic-status-ended")
        declined_card = {name: declined.get_attribute(f"data-{name}")
                         for name in ("consent", "verified")}
        declined_text = declined.inner_text()
    finally:
        changed.stop()
    page.click(".lm-MenuBar-itemLabel:text-is('Kernel')")
    page.click(".lm-Menu-itemLabel:text-is('Restart Kernel…')")
    page.evaluate(WATCH_RESTART)
    page.click(".jp-Dialog-button.jp-mod-accept")  # a new kernel process starts
    page.wait_for_selector(".fedmagic-FederationPanel:has-text('has not loaded fedmagic')",
                           timeout=START_MS)
    page.wait_for_function("() => window.fedmagicRestart === 'done'", timeout=START_MS)

    assert "hospital-a in task toolbar: data verified" in verified
    assert result.rounds == 2 and result.participants["hospital-a"].status == "uploaded"
    assert "Verify Data of the Joined Tasks" in commands
    assert "Stop This Notebook's Federated Tasks" not in commands  # it authors no task
    assert "passed" in ended and "accepted" in ended  # then forgotten with the kernel
    # What the owner declined is what the card says: nothing of the earlier code's state
    assert declined_card == {"consent": "declined", "verified": "none"}, declined_card
    assert "accepted" not in declined_text.replace("not accepted", ""), declined_text
    assert "none: declined" in declined_text, declined_text  # no round bar of a task it left
    assert page.console_errors == []


def test_the_quickstart_in_notebook_7(tmp_path, page):
    with serve("notebook", tmp_path) as notebook7:
        shutil.copy(NOTEBOOKS / "en" / "quickstart.ipynb", notebook7.workdir)

        open_notebook(page, notebook7.open("quickstart.ipynb"))
        run_all_cells(page)
        wait_for_widget(page, participants=3)
        page.wait_for_selector(".fedmagic-task .fm-summary", timeout=180_000)
        ticks = x_ticks(page)
        unreadable = in_each_theme(page, "notebook7", ".fedmagic-task")
        errors = list(page.console_errors)  # before the server stops under the page

    assert ticks == [["1", "2", "3", "4", "5"]] * 2  # loss and accuracy
    assert unreadable == {"light": [], "dark": []}
    assert errors == []
