"""The real app in a real browser: streamlit run + Debian chromium driven by Playwright (bench/browser.py).

Runs on the full bundled corpus, whose offline-pair embeddings ship prebuilt in assets/.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")

from bench.browser import (  # noqa: E402
    MINUTE,
    AppServer,
    chromium_available,
    goto,
    problems,
    submit_queries,
    wait_done,
    wait_for_widget,
)

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TITLES = {
    "Retrieval": "DPR Lens: retrieval",
    "Token attributions": "Token attributions",
    "Knowledge neurons": "Knowledge neurons",
    "Probing & evaluation": "Probing & evaluation",
    "Twin analyses": "Twin analyses",
}
QUERIES = {"country in Western Europe": "France", "1968 film by Stanley Kubrick": "2001: A Space Odyssey"}
HITS_READY = "document.querySelectorAll('.lens-hit').length >= 20"

pytestmark = pytest.mark.skipif(not chromium_available(), reason="chromium is not installed (make browser)")


def _assert_no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0, problems(page)


def test_every_page_renders_without_an_exception(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    goto(page, server.url)
    submit_queries([page], ["country in Western Europe"])
    wait_done(page, ready=HITS_READY, timeout=4 * MINUTE)
    _assert_no_exception(page)
    page.screenshot(path=str(ARTIFACTS / "retrieval.png"), full_page=True)
    links = page.locator('[data-testid="stSidebarNavLink"]')
    assert links.count() == len(TITLES)
    for number in range(links.count()):
        name = links.nth(number).inner_text().strip().splitlines()[-1]
        links.nth(number).click()
        page.locator("h1", has_text=TITLES[name]).wait_for(timeout=2 * MINUTE)
        wait_done(page, timeout=5 * MINUTE)
        _assert_no_exception(page)
        slug = re.sub(r"\W+", "-", name).strip("-").lower()
        page.screenshot(path=str(ARTIFACTS / f"page-{slug}.png"), full_page=True)
    page.close()


def test_two_sessions_at_once_get_their_own_results_and_share_one_model_load(server, browser):
    pages = [browser.new_page() for _ in QUERIES]
    for page in pages:
        goto(page, server.url)
        wait_for_widget(page, "Query", timeout=3 * MINUTE)
    submit_queries(pages, list(QUERIES))
    for page, (query, expected_title) in zip(pages, QUERIES.items()):
        page.wait_for_function(HITS_READY, timeout=4 * MINUTE)
        first_hits = page.locator(".lens-hit").all_inner_texts()
        assert any(expected_title in hit for hit in first_hits[:10]), (query, first_hits[:3])
        _assert_no_exception(page)
        page.close()
    assert server.log().count("DPR Lens loaded pair offline") == 1


def test_a_page_url_opened_first_on_a_fresh_server_goes_through_the_entrypoint(tmp_path, browser):
    # Until app.py has run once, Streamlit runs a pages/ script by itself, with its own file-name navigation.
    with AppServer(tmp_path / "streamlit.log", cache_dir=tmp_path / "cache") as app:
        page = browser.new_page()
        page.goto(f"{app.url}/token_attributions")
        page.locator("h1", has_text=TITLES["Token attributions"]).wait_for(timeout=2 * MINUTE)
        links = page.locator('[data-testid="stSidebarNavLink"]')
        names = [links.nth(number).inner_text().strip().splitlines()[-1] for number in range(links.count())]
        assert names == list(TITLES)
        links.nth(names.index("Twin analyses")).click()
        page.locator("h1", has_text=TITLES["Twin analyses"]).wait_for(timeout=2 * MINUTE)
        _assert_no_exception(page)
        page.close()
