"""What a person sees: notebooks 03-05 run in JupyterLab and the report, in Chromium.

The smoke job the runner's tests use (``conftest.smoke_grid``: two runs that finish, one that
fails, the comparison) is opened as a person would: JupyterLab started on the loopback address
with a token, Debian's Chromium driven by Playwright (``executable_path``: no browser download).
These tests only read the job's results (the notebooks reuse them), and run before the
runner's tests, which change them. In each notebook: Run All, no cell may error and
every widget must render; moving a control must change the picture it drives (compared pixel
by pixel) without the panel reporting an error. Then every image and link of the report's
index page must resolve and its tables must fit a 1400 px window. Screenshots go to
``<outputs>/tests/browser/`` (by default ``outputs/tests/browser/``), to look at after a failure.

Chromium: ``$CITYLIB_CHROMIUM`` or ``chromium`` on the PATH (``.ci/run`` installs Debian's
package when it is missing). Without it the tests fail under CI and are skipped elsewhere.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import nbformat
import pytest
from playwright.sync_api import expect, sync_playwright

from citylib.core import paths
from citylib.run import cli

CHROMIUM = os.environ.get("CITYLIB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
RUN = "good"            # the run whose notebooks are opened
NOTEBOOK_SECONDS = 240  # Run All of one notebook, at most
WIDTH, HEIGHT = 1400, 1000


def _need_chromium():
    if CHROMIUM and Path(CHROMIUM).exists():
        return
    message = "no Chromium: install Debian's chromium (.ci/run does) or set CITYLIB_CHROMIUM"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = paths.outputs() / "tests" / "browser"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@pytest.fixture(scope="module")
def job(smoke_grid) -> Path:
    """The outputs folder of the smoke job (runs ``good`` and ``other`` done, ``broken`` failed,
    their comparison), with its report rendered."""
    _need_chromium()
    _, out, _ = smoke_grid
    assert (out / "runs" / RUN / "05_objects.ipynb").is_file() and (out / "comparison" / "table2.csv").is_file()
    assert cli.main(["report", "--outputs", str(out)]) == 0
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(job, tmp_path_factory):
    """(base URL, token, folder it serves): JupyterLab on 127.0.0.1 over copies of the run's
    executed notebooks (their parameters already injected), with its own settings and workspace
    folders, notebook windowing off (every cell in the page) and news off."""
    root = tmp_path_factory.mktemp("lab")
    served = root / "notebooks"
    served.mkdir()
    for name in ("03_gradcam.ipynb", "04_embedding.ipynb", "05_objects.ipynb"):
        nb = nbformat.read(job / "runs" / RUN / name, as_version=4)
        for cell in nb.cells:                       # what the browser shows is then its own run
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, served / name)
    settings = root / "settings"
    for plugin, values in {"@jupyterlab/notebook-extension/tracker": {"windowingMode": "none",
                                                                      "autoStartDefaultKernel": True},
                           "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                                           "checkForUpdates": False}}.items():
        (settings / plugin).parent.mkdir(parents=True, exist_ok=True)
        (settings / f"{plugin}.jupyterlab-settings").write_text(json.dumps(values))
    token, port = secrets.token_hex(16), _free_port()
    env = {**os.environ, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / "workspaces"), "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
           "JUPYTER_CONFIG_DIR": str(root / "config")}
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
                             f"--port={port}", f"--IdentityProvider.token={token}",
                             f"--ServerApp.root_dir={served}", "--ServerApp.port_retries=0",
                             *(["--allow-root"] if os.geteuid() == 0 else [])],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"JupyterLab exited: {(root / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        else:
            raise RuntimeError(f"JupyterLab did not answer: {(root / 'lab.log').read_text()[-2000:]}")
        yield base, token, served
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser(job):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, shots, request):
    """A fresh browser window; its last view is saved as ``<test>-last.png``."""
    context = browser.new_context(viewport={"width": WIDTH, "height": HEIGHT})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    page.screenshot(path=shots / f"{request.node.name}-last.png")
    context.close()


# -- driving a notebook ------------------------------------------------------------------

def open_notebook(page, lab, name: str):
    base, token, _ = lab
    workspace = Path(name).stem          # its own workspace, reset: no tab of another test opens
    page.goto(f"{base}/lab/workspaces/{workspace}/tree/{name}?reset&token={token}")
    page.locator(".jp-Notebook").first.wait_for()
    page.locator(".jp-StatusBar-TextItem").filter(has_text="| Idle").wait_for(timeout=120_000)  # kernel up


def run_all(page, seconds: float = NOTEBOOK_SECONDS):
    """Run All Cells from the menu, and wait until it has begun (a cell queued or every cell
    numbered) and then ended (the kernel idle with no cell queued)."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    prompts = page.locator(".jp-Notebook .jp-CodeCell .jp-InputPrompt")
    deadline = time.monotonic() + seconds
    begun = False
    while time.monotonic() < deadline:
        texts = prompts.all_inner_texts()
        busy = page.locator(".jp-Notebook-ExecutionIndicator[data-status='busy']").count()
        queued = any("*" in t for t in texts)
        begun = begun or busy or queued or all(any(c.isdigit() for c in t) for t in texts)
        if begun and not busy and not queued:
            return
        time.sleep(0.5)
    raise AssertionError(f"Run All did not finish in {seconds:.0f} s")


def save_and_read(page, lab, name: str) -> nbformat.NotebookNode:
    """Save the notebook as the browser holds it and read it back from the server's disk."""
    served = lab[2] / name
    before = served.stat().st_mtime_ns
    page.get_by_role("menuitem", name="File", exact=True).click()
    page.get_by_role("menuitem", name="Save Notebook", exact=False).first.click()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if served.stat().st_mtime_ns != before:
            try:
                return nbformat.read(served, as_version=4)
            except (ValueError, OSError):        # caught half-written: read again
                continue
    raise AssertionError(f"{name} was not saved")


def cell_errors(notebook) -> list[str]:
    """Every error output and every code cell that did not run, as one line each."""
    found = []
    for i, cell in enumerate(c for c in notebook.cells if c.cell_type == "code"):
        if cell.execution_count is None and cell.source.strip():
            found.append(f"code cell {i} did not run")
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                found.append(f"code cell {i}: {o['ename']}: {o['evalue']}")
    return found


def widget_problems(page) -> list[str]:
    """What the page shows of a widget gone wrong: ipywidgets' "Error displaying widget" and
    the traceback a citylib panel shows when a redraw raises (``widgets.figure_view``)."""
    found = [f"widget not shown: {t[:200]}" for t in
             page.locator(".jp-OutputArea-output").filter(has_text="Error displaying widget").all_inner_texts()]
    found += [f"panel: {t.strip().splitlines()[-1]}" for t in page.locator(".citylib-error").all_inner_texts()
              if t.strip()]                                     # the traceback's last line: the error
    return found


def set_readout(page, slider, value) -> None:
    """Type ``value`` into a slider's readout, as a person editing the number does."""
    readout = slider.locator(".widget-readout")
    readout.click()
    page.keyboard.press("Control+a")
    page.keyboard.type(str(value))
    page.keyboard.press("Enter")


def picture(page, image) -> bytes:
    """The pixels a widget image shows, once its source has loaded."""
    image.scroll_into_view_if_needed()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return image.screenshot()


def changes(page, image, act, seconds: float = 60) -> bool:
    """Whether the picture of ``image`` changes after ``act()`` (waits up to ``seconds``)."""
    before = picture(page, image)
    act()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        if picture(page, image) != before:
            return True
    return False


def whole_notebook(page, path: Path) -> None:
    """A screenshot of the whole notebook: the window made as tall as the notebook's content."""
    outer = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer"
    tall = page.evaluate(f"() => document.querySelector('{outer}').scrollHeight")
    page.set_viewport_size({"width": WIDTH, "height": min(int(tall) + 150, 30_000)})
    page.evaluate(f"() => document.querySelector('{outer}').scrollTop = 0")
    time.sleep(0.5)
    page.screenshot(path=path)
    page.set_viewport_size({"width": WIDTH, "height": HEIGHT})


def notebook_runs_clean(page, lab, name: str, shots: Path) -> None:
    open_notebook(page, lab, name)
    run_all(page)
    whole_notebook(page, shots / f"{Path(name).stem}.png")
    problems = cell_errors(save_and_read(page, lab, name)) + widget_problems(page)
    assert not problems, f"{name}: " + "; ".join(problems)
    assert page.locator(".jupyter-widgets").count() > 0, f"{name}: no widget rendered"


def threshold_and_toggle_redraw(page, panel, image, slider, value: float, button: str, shot: Path) -> None:
    """Typing ``value`` into the threshold slider's readout, then pressing the toggle ``button``,
    each redraw ``image``; the readout shows the value in [0, 1]; no panel reports an error."""
    assert changes(page, image, lambda: set_readout(page, slider, value)), "the threshold slider redraws nothing"
    assert slider.locator(".widget-readout").inner_text().strip() == f"{value:.2f}"
    toggle = panel.locator(".widget-toggle-button").filter(has_text=button).first
    assert changes(page, image, toggle.click), f"choosing {button} redraws nothing"
    panel.screenshot(path=shot)
    assert not widget_problems(page), widget_problems(page)


# -- the tests ---------------------------------------------------------------------------

def test_gradcam_panel_redraws_for_threshold_and_method(page, lab, shots):
    notebook_runs_clean(page, lab, "03_gradcam.ipynb", shots)
    panel = page.locator(".jp-OutputArea-output .widget-vbox").filter(has=page.locator(".widget-toggle-buttons")).first
    image = panel.locator("img.widget-image").first
    slider = panel.locator(".widget-slider").first
    threshold_and_toggle_redraw(page, panel, image, slider, 0.9, "layercam", shots / "03_gradcam_panel.png")


def test_explorer_shows_the_picked_image_and_switches_descriptor(page, lab, shots):
    notebook_runs_clean(page, lab, "04_embedding.ipynb", shots)
    panel = page.locator(".jp-OutputArea-output .widget-vbox").filter(has=page.locator(".widget-dropdown")).first
    images = panel.locator("img.widget-image")
    expect(images).to_have_count(2)                                   # a map and a point
    the_map, the_point = images.nth(0), images.nth(1)
    slider = panel.locator(".widget-slider").first
    assert changes(page, the_point, lambda: set_readout(page, slider, 3)), "picking a point shows nothing new"
    descriptor = panel.locator(".widget-dropdown select").nth(1)
    assert changes(page, the_map, lambda: descriptor.select_option(label="visual explanation"), seconds=120), \
        "mapping the visual explanations instead of the masks redraws no map"
    panel.screenshot(path=shots / "04_explorer.png")
    assert not widget_problems(page), widget_problems(page)


def test_threshold_panel_redraws_the_histograms(page, lab, shots):
    notebook_runs_clean(page, lab, "05_objects.ipynb", shots)
    slider = page.locator(".widget-slider").filter(has_text="threshold").last
    panel = page.locator(".jp-OutputArea-output .widget-vbox").filter(has=slider).last
    image = panel.locator("img.widget-image").first
    label = slider.locator(".widget-label").first
    assert label.evaluate("e => e.scrollWidth <= e.clientWidth"), "the slider's label is cut off"
    assert 0 <= float(slider.locator(".widget-readout").inner_text()) <= 1
    threshold_and_toggle_redraw(page, panel, image, slider, 0.8, "lift", shots / "05_threshold_panel.png")


BROKEN = '''\
import ipywidgets as w
import matplotlib.pyplot as plt
from citylib.figures import widgets

def figure(k):
    if k > 0:
        raise RuntimeError("this panel is broken on purpose")
    return plt.figure(figsize=(1, 1))

k = w.IntSlider(0, 0, 3, description="broken")
w.VBox([k, widgets.figure_view(figure, {"k": k}, "100px")])
'''


def test_a_callback_that_raises_is_caught(page, lab, shots):
    """The checks above can fail: a panel whose redraw raises is reported by ``widget_problems``."""
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(BROKEN)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, lab[2] / "broken.ipynb")
    open_notebook(page, lab, "broken.ipynb")
    run_all(page)
    assert not widget_problems(page)
    set_readout(page, page.locator(".widget-slider").first, 2)
    page.locator(".citylib-error").filter(has_text="broken on purpose").wait_for(timeout=30_000)
    kept = page.locator("img.widget-image").first               # the failed redraw left the picture
    assert not changes(page, kept, lambda: set_readout(page, page.locator(".widget-slider").first, 3), seconds=3)
    page.screenshot(path=shots / "broken_panel.png")
    assert any("RuntimeError: this panel is broken on purpose" in p for p in widget_problems(page))


def test_report_images_and_links_resolve_and_tables_fit(page, job, shots):
    index = job / "report" / "index.html"
    page.goto(index.as_uri())
    page.wait_for_load_state("load")
    page.evaluate("() => document.querySelectorAll('details').forEach(d => d.open = true)")
    page.screenshot(path=shots / "report.png", full_page=True)
    images = page.evaluate("() => [...document.images].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    assert images and all(ok for _, ok in images), [src for src, ok in images if not ok]
    links = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href'))")
    ids = set(page.evaluate("() => [...document.querySelectorAll('[id]')].map(e => e.id)"))
    broken = [h for h in links if (urllib.parse.unquote(h[1:]) not in ids if h.startswith("#")
                                   else not (index.parent / h).is_file())]
    assert links and not broken, broken
    assert {"findings", "accuracy", f"run-{RUN}"} <= ids
    first = page.locator("h2").first.inner_text()
    assert first == "Findings", f"the page starts with {first!r}"
    wide = page.evaluate("() => document.documentElement.scrollWidth")
    assert wide <= WIDTH, f"the page is {wide} px wide in a {WIDTH} px window"
