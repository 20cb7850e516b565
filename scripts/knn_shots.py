"""Few-shot examples chosen per message: its k nearest train messages (TF-IDF character 1-3-grams, cosine) as the
earlier turns of the sentiment prompt, most similar last. Measures it against the default prompt on the same items.

    python scripts/knn_shots.py --model "$(bash ../shared/models/get-qwen-proxy)" --lang zh [--limit 200] [--k 8]

Each message gets its own prompt, so the prefix cache cannot be shared: every message pays a forward pass over
its examples (about 10x the default prompt's cost). Prints one JSON object: the default prompt's accuracy, the
per-message prompt's, a plain vote of the same neighbours' labels, the two prompts averaged, and the paired
gained/lost counts against the default prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.engine import Engine  # noqa: E402
from worker.engine.sentiment import SentimentPipeline  # noqa: E402
from worker.evaluate import balanced_subset, read_examples  # noqa: E402
from worker.settings import Settings  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def main() -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--lang", required=True, help="zh or en: sentiment-LANG.{train,dev}.jsonl in ../shared/data")
    ap.add_argument("--limit", type=int, default=200, help="balanced dev items (seed 0)")
    ap.add_argument("--k", type=int, default=8, help="neighbours per message")
    a = ap.parse_args()
    train = read_examples(str(DATA / f"sentiment-{a.lang}.train.jsonl"))
    dev = balanced_subset(read_examples(str(DATA / f"sentiment-{a.lang}.dev.jsonl")), a.limit, seed=0)
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    x = vec.fit_transform([e.text for e in train])
    sims = (vec.transform([e.text for e in dev]) @ x.T).toarray()
    engine = Engine(Settings(model=a.model, threads=2))
    engine.load()
    y = np.array([1 if e.label == "positive" else 0 for e in dev])
    base = engine.score([e.text for e in dev])
    db = (base.label_logits[:, 0] - base.label_logits[:, 1]).numpy()
    out = []
    t0 = time.perf_counter()
    for i, e in enumerate(dev):
        nn = np.argsort(-sims[i])[: a.k][::-1]  # most similar last, nearest the message
        shots = tuple((train[j].text[:200], train[j].label) for j in nn)
        pipe = SentimentPipeline(engine.tokenizer, engine.model, shots)  # this message's own prefix
        s = pipe.score([e.text], batch_size=1, max_tokens=engine.settings.sentiment_max_tokens)
        out.append(float(s.label_logits[0, 0] - s.label_logits[0, 1]))
    dk = np.array(out)
    vote = np.array([np.mean([train[j].label == "positive" for j in np.argsort(-sims[i])[: a.k]])
                     for i in range(len(dev))])
    right_b, right_k = (db > 0) == y, (dk > 0) == y
    print(json.dumps({
        "lang": a.lang, "n": len(dev), "k": a.k, "seconds": round(time.perf_counter() - t0, 1),
        "default": float(right_b.mean()), "knn_prompt": float(right_k.mean()), "knn_prompt_pos": float((dk > 0).mean()),
        "tfidf_knn_vote": float(((vote > 0.5) == y).mean()),
        "ensemble": float((((db / db.std() + dk / dk.std()) > 0) == y).mean()),
        "gained": int((right_k & ~right_b).sum()), "lost": int((~right_k & right_b).sum()),
    }))


if __name__ == "__main__":
    main()
