"""The chat page in a real headless browser (Debian's chromium, driven by Playwright), in front of the real web app
and a real worker: send a message, see its sentiment badge, watch the reply being written, then the stored reply.

CI installs chromium (``.ci/run``) and this test must run there; elsewhere it is skipped when no chromium is found.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from worker.testing import CHROMIUM_ARGS, WebProcess, WorkerProcess, chromium_binary, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.browser]

def chromium() -> str:
    """The system's chromium; skipped where there is none (failed in CI, unless CI could not install one)."""
    found = chromium_binary()
    if found:
        return found
    why = os.environ.get("CI_NO_BROWSER")
    if os.environ.get("CI") and not why:
        pytest.fail("no chromium in CI: .ci/run installs Debian's chromium (apt-get install chromium)")
    pytest.skip(f"no chromium found ({why or 'apt-get install chromium'}): the page's browser test needs one")


@pytest.fixture(scope="module")
def page_url(redis_base_url, tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    # Sampling makes the tiny model's random weights write visible text (greedy, it repeats one newline), and a
    # long reply with frequent token events makes the writing visible.
    env = worker_env(
        redis_base_url, str(tiny_model_dir), tmp_path_factory.mktemp("cache"), ALLINONE_DO_SAMPLE="true",
        ALLINONE_TEMPERATURE="1.5", ALLINONE_TOP_P="1", ALLINONE_SEED="7", ALLINONE_MAX_NEW_TOKENS="300",
        ALLINONE_TOKEN_EVENT_SECONDS="0.05", ALLINONE_KEY_PREFIX="browser", ALLINONE_LIVE_QUEUE="browser-live",
        ALLINONE_BULK_QUEUE="browser-bulk",
    )
    worker = WorkerProcess(env=env, log_path=tmp_path_factory.mktemp("logs") / "worker.log").start()
    try:
        web = WebProcess(env=env).start()
    except BaseException:
        worker.stop()
        raise
    try:
        yield web.url
    finally:
        web.stop()
        worker.stop()


def test_the_page_shows_the_badge_and_the_reply_as_it_is_written(page_url, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(page_url)
            # Record every text the reply bubble shows, to see it grow before it is done.
            page.evaluate(
                """() => { window.replyTexts = [];
                  new MutationObserver(() => { const bot = document.querySelector('.bot');
                    if (bot) window.replyTexts.push(bot.textContent); })
                  .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }"""
            )
            # When a person types a message and presses Enter
            page.fill("#text", "The room was lovely and the staff friendly")
            page.press("#text", "Enter")
            # Then the turn appears with its sentiment badge, and the reply is written, then marked done
            turn = page.locator(".turn").first
            turn.wait_for()
            page.wait_for_function("document.querySelector('.turn')?.dataset.status === 'done'", timeout=60_000)
            badge = turn.locator(".badge").inner_text()
            label = turn.get_attribute("data-sentiment")
            assert label in ("positive", "negative") and badge.startswith(label) and badge.endswith("%")
            mid = turn.get_attribute("data-message-id")
            stored = httpx.get(f"{page_url}/messages/{mid}").json()
            shown = turn.locator(".bot").inner_text()
            assert stored["status"] == "done" and stored["sentiment"]["label"] == label
            assert shown.strip() == (stored["reply"] or "(empty reply)").strip()
            texts = [t for t in page.evaluate("window.replyTexts") if t.strip()]
            growing = [t for t in texts if t != texts[-1]]
            assert len(set(growing)) >= 2, "the reply appeared all at once, not as it was written"
            page.screenshot(path=str(tmp_path / "web.png"))
        finally:
            browser.close()
