"""The real app in a real browser: streamlit run + Debian chromium driven by Playwright.

Runs on the full bundled corpus, whose offline-pair embeddings ship prebuilt in assets/.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-quic"]
TITLES = {"Retrieval": "DPR Lens: retrieval", "Token attributions": "Token attributions",
          "Knowledge neurons": "Knowledge neurons", "Probing & evaluation": "Probing & evaluation"}
QUERIES = {"country in Western Europe": "France", "1968 film by Stanley Kubrick": "2001: A Space Odyssey"}

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (make browser)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "streamlit.log"
    env = {k: v for k, v in os.environ.items() if k != "DPR_LENS_CORPUS_LIMIT"}
    env.update(DPR_LENS_CACHE=str(tmp_path_factory.getbasetemp() / "browser-cache"))
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
             "--server.address", "127.0.0.1", "--server.headless", "true"],
            cwd=Path(__file__).resolve().parent.parent, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            process.kill()
            pytest.fail("streamlit did not become healthy:\n" + log_path.read_text()[-2000:])
        yield url, log_path
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield instance
        instance.close()


def _ask(page, url: str, query: str) -> None:
    page.goto(url)
    box = page.get_by_label("Query")
    box.wait_for(timeout=180_000)
    box.fill(query)
    box.press("Enter")
    page.wait_for_function("document.querySelectorAll('.lens-hit').length >= 20", timeout=240_000)


def _assert_no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0


def test_every_page_renders_without_an_exception(server, browser):
    url, _ = server
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    _ask(page, url, "country in Western Europe")
    _assert_no_exception(page)
    page.screenshot(path=str(ARTIFACTS / "retrieval.png"), full_page=True)
    links = page.locator('[data-testid="stSidebarNavLink"]')
    assert links.count() == 4
    for number in range(links.count()):
        name = links.nth(number).inner_text().strip().splitlines()[-1]
        links.nth(number).click()
        page.locator("h1", has_text=TITLES[name]).wait_for(timeout=120_000)
        page.wait_for_function(
            "document.querySelector('[data-testid=\"stApp\"]').dataset.testScriptState === 'notRunning'",
            timeout=300_000)
        _assert_no_exception(page)
        slug = re.sub(r"\W+", "-", name).strip("-").lower()
        page.screenshot(path=str(ARTIFACTS / f"page-{slug}.png"), full_page=True)
    page.close()


def test_two_sessions_at_once_get_their_own_results_and_share_one_model_load(server, browser):
    url, log_path = server
    pages = [browser.new_page() for _ in QUERIES]
    for page, query in zip(pages, QUERIES):
        page.goto(url)
        page.get_by_label("Query").wait_for(timeout=180_000)
        page.get_by_label("Query").fill(query)
    for page in pages:
        page.get_by_label("Query").press("Enter")
    for page, (query, expected_title) in zip(pages, QUERIES.items()):
        page.wait_for_function("document.querySelectorAll('.lens-hit').length >= 20", timeout=240_000)
        first_hits = page.locator(".lens-hit").all_inner_texts()
        assert any(expected_title in hit for hit in first_hits[:10]), (query, first_hits[:3])
        _assert_no_exception(page)
        page.close()
    assert log_path.read_text().count("DPR Lens loaded pair offline") == 1
