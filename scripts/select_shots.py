"""Choose few-shot examples from a scored pool of train messages (scripts/dump_features.py output).

Method ("prototypes"): standardise the pool's final hidden states; for each language and label keep the messages
the current prompt already labels right, of ordinary length, and take the k nearest to their class centroid --
typical, unambiguous examples of what each label looks like in that corpus. The chosen examples are interleaved
(zh pos, en neg, zh neg, en pos, ...) so neither a label nor a language sits in a block or always last.

    python scripts/select_shots.py --pool zh=/tmp/aio/base-zh-pool.npz --pool en=/tmp/aio/base-en-pool.npz \
        --per-class 4 --out shots16.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def prototypes(path: str, k: int, max_chars: int, skip: int = 0) -> dict[int, list[str]]:
    d = np.load(path)
    x, y, texts = d["hidden"], d["labels"], [str(t) for t in d["texts"]]
    diff = d["label_logits"][:, 0] - d["label_logits"][:, 1]
    z = (x - x.mean(0)) / (x.std(0) + 1e-6)
    out = {}
    for label in (1, 0):
        ok = (y == label) & (((diff > 0).astype(int)) == y) & np.array([8 <= len(t) <= max_chars for t in texts])
        idx = np.flatnonzero(ok)
        centroid = z[y == label].mean(0)
        dist = np.linalg.norm(z[idx] - centroid, axis=1)
        out[label] = [texts[i] for i in idx[np.argsort(dist)][skip : skip + k]]
    return out


def tfidf_prototypes(path: str, k: int, max_chars: int, skip: int = 0, seed: int = 0) -> dict[int, list[str]]:
    """The same idea without the model: the train messages a TF-IDF classifier (fitted on train) is surest of."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from worker.evaluate import read_examples

    ex = read_examples(path)
    texts = [e.text for e in ex]
    y = np.array([1 if e.label == "positive" else 0 for e in ex])
    vec = TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2)
    xs = vec.fit_transform(texts)
    margin = LogisticRegression(C=4.0, max_iter=2000).fit(xs, y).decision_function(xs)
    out = {}
    for label in (1, 0):
        sign = 1 if label else -1
        ok = np.flatnonzero((y == label) & np.array([12 <= len(t) <= max_chars for t in texts]))
        ranked = ok[np.argsort(-sign * margin[ok])]
        # spread over the confident quarter rather than the extreme few (which repeat one phrase)
        top = ranked[: max(len(ranked) // 4, k)]
        pick = np.random.default_rng(seed).choice(top, size=skip + k, replace=False)[skip:]
        out[label] = [texts[i] for i in pick]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", action="append", required=True, help="lang=features.npz")
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--skip", type=int, default=0, help="skip the nearest n (another draw of the same method)")
    ap.add_argument("--max-chars", default="zh=60,en=120")
    ap.add_argument("--out", required=True)
    ap.add_argument("--method", choices=["hidden", "tfidf"], default="hidden")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    limits = dict(kv.split("=") for kv in a.max_chars.split(","))
    chosen = {}
    for spec in a.pool:
        lang, path = spec.split("=", 1)
        if a.method == "hidden":
            chosen[lang] = prototypes(path, a.per_class, int(limits.get(lang, 120)), a.skip)
        else:
            chosen[lang] = tfidf_prototypes(path, a.per_class, int(limits.get(lang, 120)), a.skip, a.seed)
    langs = list(chosen)
    shots = []
    # interleave: languages alternate, labels alternate, and the label pattern shifts by language
    for j in range(a.per_class):
        for li, lang in enumerate(langs):
            first = (j + li) % 2
            for label in (first, 1 - first):
                shots.append([chosen[lang][label][j], "positive" if label else "negative"])
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(shots, f, ensure_ascii=False, indent=1)
    print(len(shots), "shots ->", a.out)
    for t, lab in shots:
        print(lab[:3], t[:90])


if __name__ == "__main__":
    main()
