"""The web app (space/app.py) in a real browser: Chromium driven by Playwright, the app served on 127.0.0.1.

The page's numbers must be the Python API's for the same files. Needs gradio and playwright
(requirements-dev.txt) and a Chromium (`.ci/run` installs Debian's `chromium` when it is missing);
without them the tests are skipped, saying what is missing, except under CI (the CI variable set),
where `.ci/run` installs all three and a missing one fails the run instead of hiding the test.
"""

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image



def need(available, reason):
    """Skip the module without `available`; under CI, where everything is installed, fail instead."""
    if not available:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}, and CI must run the browser test", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


need(importlib.util.find_spec("gradio"), "the web app needs gradio (pip install -r requirements-dev.txt)")
need(importlib.util.find_spec("playwright"), "the browser test needs playwright (pip install -r requirements-dev.txt)")
from playwright import sync_api  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = next((path for path in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "",
                                   shutil.which("chromium-browser") or "") if path and os.access(path, os.X_OK)), None)
need(CHROMIUM, "no Chromium found (apt-get install -y chromium)")
START_TIMEOUT_S = 120  # the app imports torch and loads the model before it answers
POLL_S = 0.1  # a refused connection costs nothing: the first answer is seen at once
PAGE_TIMEOUT_MS = 60_000  # one scoring request on the tiny model takes about a second; contended CI is slower
sync_api.expect.set_options(timeout=PAGE_TIMEOUT_MS)  # every expect below waits at most this long
TOLERANCE = 1e-5  # the page shows the float64 value; both paths run the same float32 model
# Playwright's own --disable-features list (playwright 1.65, less its Windows and Edge ones), then Chromium's
# omnibox pop-ups: each window (one per test) preloads two in a renderer of their own, a quarter of Chromium's
# CPU here, for an address bar a headless browser never shows. Chromium keeps only the last --disable-features
# it is given, so Playwright's list is repeated.
DISABLED_FEATURES = ("AvoidUnnecessaryBeforeUnloadCheckSync", "DestroyProfileOnBrowserClose", "HttpsUpgrades",
                     "HttpsFirstBalancedModeAutoEnable", "LensOverlay", "MediaRouter", "PaintHolding",
                     "ThirdPartyStoragePartitioning", "AvoidCorsURLLoaderRestartOnRedirect", "OptimizationHints",
                     "NetworkTimeServiceQuerying", "AimEnabled", "PreconnectToSearch",
                     "WebUIOmniboxPopup", "WebUIOmniboxAimPopup")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    """Poll the app until it answers, at most START_TIMEOUT_S and START_TIMEOUT_S / POLL_S tries."""
    deadline = time.monotonic() + START_TIMEOUT_S
    for _ in range(int(START_TIMEOUT_S / POLL_S)):
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with status {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    raise TimeoutError(f"the app did not answer at {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("reference", "generated", "other", "third"):
        Image.fromarray(rng.integers(0, 256, (40, 32, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    (folder / "notes.png").write_text("this is text, not an image")
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def server(tiny_repo, images, tmp_path_factory):
    """The app on a free port of 127.0.0.1 with a search index of `images`; stopped at the end."""
    from nearid.commands import search

    work = tmp_path_factory.mktemp("app")
    index = work / "index"
    search.main(["index", "--index-dir", str(index), "--images", *(str(images / f"{n}.png") for n in
                 ("reference", "other", "third")), "--model", str(tiny_repo), "--cache-dir", str(work / "cache")])
    port, log = free_port(), work / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "space" / "app.py"), "--model", str(tiny_repo),
                                    "--index", str(index), "--port", str(port)], cwd=work, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                  "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield url, process
    finally:
        stop(process)


@pytest.fixture(scope="module")
def api(tiny_repo):
    """The Python API on the app's model: the numbers the page must show."""
    from nearid import IdentityScorer

    return IdentityScorer(str(tiny_repo))


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                           args=["--disable-features=" + ",".join(DISABLED_FEATURES)])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.goto(server[0])
    yield page
    page.close()


def upload(page, elem_id: str, paths) -> None:
    """Drop files into a gr.File and wait until each is uploaded (its download link shows; while uploading,
    the box already shows the names)."""
    paths = [paths] if isinstance(paths, Path) else paths
    page.set_input_files(f"#{elem_id} input[type=file]", [str(p) for p in paths])
    for path in paths:
        sync_api.expect(page.locator(f'#{elem_id} a[href$="/{path.name}"]')).to_have_count(1)


def number(page, elem_id: str, done_id: str, done_text: str) -> float:
    """A gr.Number's value, once the message `done_id` says the request finished (the field starts at 0)."""
    sync_api.expect(page.locator(f"#{done_id}")).to_contain_text(done_text)
    return float(page.locator(f"#{elem_id} input").input_value())


def test_score_in_the_browser_equals_the_python_api(page, images, api, tmp_path):
    upload(page, "score-references", images / "reference.png")
    upload(page, "score-generated", images / "generated.png")
    page.click("#score-button")
    shown = number(page, "score-value", "score-message", "Scored 1 generated image")
    expected = api.score(images / "reference.png", images / "generated.png")
    assert shown == pytest.approx(expected, abs=TOLERANCE)
    sync_api.expect(page.locator("#score-table")).to_contain_text("generated.png")
    sync_api.expect(page.locator("#score-heatmaps img")).to_have_count(2)  # attention and correspondence
    page.screenshot(path=str(tmp_path / "score.png"), full_page=True)
    assert (tmp_path / "score.png").stat().st_size > 10_000


@pytest.mark.parametrize("bad, message", [("notes.png", "could not be read as an image"),
                                          ("empty.png", "is an empty file")])
def test_a_bad_upload_is_a_message_and_the_server_goes_on(page, server, images, api, bad, message):
    upload(page, "score-references", images / bad)
    upload(page, "score-generated", images / "generated.png")
    page.click("#score-button")
    sync_api.expect(page.locator("#score-message")).to_contain_text(message)
    assert server[1].poll() is None
    # the same page still works
    page.get_by_role("tab", name="Compare").click()
    upload(page, "compare-first", images / "reference.png")
    upload(page, "compare-second", images / "other.png")
    page.click("#compare-button")
    expected = api.score(images / "reference.png", images / "other.png")
    shown = number(page, "compare-value", "compare-message", "Identity similarity")
    assert shown == pytest.approx(expected, abs=TOLERANCE)
    sync_api.expect(page.locator("#compare-heatmaps img")).to_have_count(4)


def test_search_shows_the_top_hits_with_scores(page, images):
    page.get_by_role("tab", name="Search").click()
    upload(page, "search-query", images / "reference.png")
    page.click("#search-button")
    sync_api.expect(page.locator("#search-message")).to_contain_text("Top 3 of 3 gallery images")
    sync_api.expect(page.locator("#search-hits img")).to_have_count(3)
    sync_api.expect(page.locator("#search-hits")).to_contain_text("#1 1.0000 reference.png")
