"""The metric functions, on hand-computed cases."""

from __future__ import annotations

import pytest

from worker.tools import metrics

P, N = "positive", "negative"


def test_confusion_matrix_rows_are_truth_and_columns_predictions():
    # Given 3 positives (2 found) and 2 negatives (1 found)
    y_true = [P, P, P, N, N]
    y_pred = [P, P, N, P, N]
    # Then
    cm = metrics.confusion_matrix(y_true, y_pred)
    assert cm == [[2, 1], [1, 1]]
    assert metrics.accuracy(cm) == pytest.approx(3 / 5)
    assert metrics.per_class_recall(cm) == {P: pytest.approx(2 / 3), N: pytest.approx(1 / 2)}
    assert metrics.positive_rate(cm) == pytest.approx(3 / 5)
    # F1 positive: 2*2/(3+3) = 2/3; F1 negative: 2*1/(2+2) = 1/2
    assert metrics.per_class_f1(cm) == {P: pytest.approx(2 / 3), N: pytest.approx(1 / 2)}
    assert metrics.macro_f1(cm) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_macro_f1_of_a_classifier_that_never_says_negative():
    cm = metrics.confusion_matrix([P, P, N, N], [P, P, P, P])
    assert cm == [[2, 0], [2, 0]]
    assert metrics.per_class_f1(cm) == {P: pytest.approx(2 / 3), N: 0.0}
    assert metrics.positive_rate(cm) == 1.0


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    # Given two bins: [0.9, 1.0) holds 0.9, 0.9 (one right: accuracy 0.5); [0.6, 0.7) holds 0.6, 0.6 (both right)
    conf = [0.9, 0.9, 0.6, 0.6]
    correct = [True, False, True, True]
    # Then ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.6| = 0.4
    assert metrics.expected_calibration_error(conf, correct) == pytest.approx(0.4)
    bins = metrics.reliability_bins(conf, correct)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 4
    assert bins[9]["count"] == 2 and bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.9)
    assert bins[6]["count"] == 2 and bins[6]["accuracy"] == 1.0


def test_ece_of_a_perfectly_calibrated_set_is_zero_and_confidence_one_lands_in_the_top_bin():
    assert metrics.expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0.0)
    assert metrics.reliability_bins([1.0], [True])[9]["count"] == 1
    assert metrics.expected_calibration_error([], []) == 0.0


def test_roc_auc_counts_the_pairs_a_score_orders_right():
    # 2 positives x 2 negatives = 4 pairs: (0.9 > 0.1), (0.9 > 0.5), (0.5 = 0.5: half), (0.5 > 0.1) -> 3.5 / 4
    assert metrics.roc_auc([0.9, 0.5, 0.5, 0.1], [P, P, N, N]) == pytest.approx(0.875)
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [P, P, N, N]) == 0.0
    assert metrics.roc_auc([0.7] * 4, [P, N, P, N]) == 0.5  # one constant score ranks nothing
