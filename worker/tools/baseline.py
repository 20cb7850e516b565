"""The classifier to beat: TF-IDF character 1-3-grams + logistic regression, fitted on a train split.

The one definition of it: ``python -m worker.evaluate`` scores it beside the model in the same run, and anything
else that needs a trained text classifier on these data sets builds it here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.tools.datasets import Example


def tfidf_char_vectorizer() -> Any:
    """Character 1-3-grams within word boundaries, sublinear term frequency: works for Chinese and English alike."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(analyzer="char_wb", ngram_range=(1, 3), sublinear_tf=True, min_df=2, max_features=300_000)


def baseline_classifier() -> Any:
    """The unfitted baseline pipeline (scikit-learn, from the ``eval`` extra)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(tfidf_char_vectorizer(), LogisticRegression(C=4.0, max_iter=2000, class_weight="balanced"))


def baseline_predict(train: Sequence[Example], texts: Sequence[str]) -> list[str]:
    """The baseline fitted on ``train``, then its labels for ``texts``."""
    clf = baseline_classifier()
    clf.fit([e.text for e in train], [e.label for e in train])
    return [str(p) for p in clf.predict(list(texts))]
