"""The evaluation harness: metrics on hand-computed cases, then the whole CLI on the tiny model."""

from __future__ import annotations

import csv
import json
import random

import pytest

from worker import evaluate as ev
from worker.evaluate import Example

P, N = "positive", "negative"


# ---------------------------------------------------------------------------------------------- metrics
def test_confusion_matrix_rows_are_truth_and_columns_predictions():
    # Given 3 positives (2 found) and 2 negatives (1 found)
    y_true = [P, P, P, N, N]
    y_pred = [P, P, N, P, N]
    # Then
    cm = ev.confusion_matrix(y_true, y_pred)
    assert cm == [[2, 1], [1, 1]]
    assert ev.accuracy(cm) == pytest.approx(3 / 5)
    assert ev.per_class_recall(cm) == {P: pytest.approx(2 / 3), N: pytest.approx(1 / 2)}
    assert ev.positive_rate(cm) == pytest.approx(3 / 5)
    # F1 positive: 2*2/(3+3) = 2/3; F1 negative: 2*1/(2+2) = 1/2
    assert ev.per_class_f1(cm) == {P: pytest.approx(2 / 3), N: pytest.approx(1 / 2)}
    assert ev.macro_f1(cm) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_macro_f1_of_a_classifier_that_never_says_negative():
    cm = ev.confusion_matrix([P, P, N, N], [P, P, P, P])
    assert cm == [[2, 0], [2, 0]]
    assert ev.per_class_f1(cm) == {P: pytest.approx(2 / 3), N: 0.0}
    assert ev.positive_rate(cm) == 1.0


def test_ece_is_the_weighted_gap_between_confidence_and_accuracy():
    # Given two bins: [0.9, 1.0) holds 0.9, 0.9 (one right: accuracy 0.5); [0.6, 0.7) holds 0.6, 0.6 (both right)
    conf = [0.9, 0.9, 0.6, 0.6]
    correct = [True, False, True, True]
    # Then ECE = 2/4 * |0.5 - 0.9| + 2/4 * |1.0 - 0.6| = 0.4
    assert ev.expected_calibration_error(conf, correct) == pytest.approx(0.4)
    bins = ev.reliability_bins(conf, correct)
    assert len(bins) == 10 and sum(b["count"] for b in bins) == 4
    assert bins[9]["count"] == 2 and bins[9]["accuracy"] == 0.5 and bins[9]["confidence"] == pytest.approx(0.9)
    assert bins[6]["count"] == 2 and bins[6]["accuracy"] == 1.0


def test_ece_of_a_perfectly_calibrated_set_is_zero_and_confidence_one_lands_in_the_top_bin():
    assert ev.expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0.0)
    assert ev.reliability_bins([1.0], [True])[9]["count"] == 1
    assert ev.expected_calibration_error([], []) == 0.0


def test_roc_auc_counts_the_pairs_a_score_orders_right():
    # 2 positives x 2 negatives = 4 pairs: (0.9 > 0.1), (0.9 > 0.5), (0.5 = 0.5: half), (0.5 > 0.1) -> 3.5 / 4
    assert ev.roc_auc([0.9, 0.5, 0.5, 0.1], [P, P, N, N]) == pytest.approx(0.875)
    assert ev.roc_auc([0.1, 0.2, 0.8, 0.9], [P, P, N, N]) == 0.0
    assert ev.roc_auc([0.7] * 4, [P, N, P, N]) == 0.5  # one constant score ranks nothing


def test_balanced_subset_is_balanced_deterministic_and_in_file_order():
    ex = [Example(f"p{i}", P) for i in range(30)] + [Example(f"n{i}", N) for i in range(10)]
    random.Random(1).shuffle(ex)
    sub = ev.balanced_subset(ex, 12)
    assert [e.label for e in sub].count(P) == 6 and len(sub) == 12
    assert sub == ev.balanced_subset(ex, 12)  # same seed, same subset
    assert sub != ev.balanced_subset(ex, 12, seed=5)
    assert [ex.index(e) for e in sub] == sorted(ex.index(e) for e in sub)
    # more than one label has: the other label fills up
    assert [e.label for e in ev.balanced_subset(ex, 30)].count(N) == 10


def test_read_examples_from_jsonl_and_csv_with_other_field_names(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "good", "label": "positive"}\n\n{"text": "bad", "label": "neg"}\n')
    assert ev.read_examples(tmp_path / "a.jsonl") == [Example("good", P), Example("bad", N)]
    (tmp_path / "b.csv").write_text('review,stars\n"fine, really",1\nawful,0\n')
    got = ev.read_examples(tmp_path / "b.csv", text_field="review", label_field="stars")
    assert got == [Example("fine, really", P), Example("awful", N)]
    (tmp_path / "c.jsonl").write_text('{"text": "meh", "label": "neutral"}\n')
    with pytest.raises(ValueError, match="neither positive nor negative"):
        ev.read_examples(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="needs the fields"):
        ev.read_examples(tmp_path / "b.csv")


def test_find_train_split_next_to_the_test_file(tmp_path):
    (tmp_path / "s-zh.train.jsonl").write_text("")
    (tmp_path / "s-zh.test.jsonl").write_text("")
    assert ev.find_train_split(tmp_path / "s-zh.test.jsonl") == tmp_path / "s-zh.train.jsonl"
    assert ev.find_train_split(tmp_path / "s-en.test.jsonl") is None
    assert ev.find_train_split(tmp_path / "other.jsonl") is None


def test_baseline_learns_a_separable_toy_task():
    train = [Example(f"great lovely {i}", P) for i in range(20)] + [Example(f"awful broken {i}", N) for i in range(20)]
    assert ev.baseline_predict(train, ["so lovely and great", "broken, awful"]) == [P, N]


# ---------------------------------------------------------------------------------------------- the CLI
POS_TEXTS = ["The hotel was great, the staff friendly.", "服务很好，房间干净。", "Lovely room, clean and quiet.",
             "很满意，下次还来。", "Great value, would stay again.", "非常好的书。"]
NEG_TEXTS = ["Terrible service, never again.", "房间太小，隔音很差。", "Dirty and noisy.",
             "不推荐，很失望。", "The worst stay of my life.", "质量很差。"]


def _write_split(tmp_path, name, k):
    rows = [{"text": t, "label": P} for t in POS_TEXTS[:k]] + [{"text": t, "label": N} for t in NEG_TEXTS[:k]]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path, rows


def _run_cli(capsys, args, settings):
    import worker.settings as ws

    # the CLI builds Settings from the environment; point it at the tiny model
    env = {"ALLINONE_MODEL": settings.model, "ALLINONE_DTYPE": "float32", "ALLINONE_THREADS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        ws.get_settings.cache_clear()
        assert ev.main(args) == 0
    return capsys.readouterr().out


def _check_consistent(r, n):
    cm = r["confusion_matrix"]
    assert r["n"] == n == sum(map(sum, cm))
    assert r["accuracy"] == pytest.approx((cm[0][0] + cm[1][1]) / n)
    assert r["positive_rate"] == pytest.approx((cm[0][0] + cm[1][0]) / n)
    assert r["recall"]["positive"] == pytest.approx(cm[0][0] / sum(cm[0]))
    assert 0.0 <= r["ece"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
    assert sum(b["count"] for b in r["reliability"]) == n


def test_harness_end_to_end_on_the_tiny_model_with_baseline_and_plot(tmp_path, capsys, tiny_settings):
    # Given a test split and a train split beside it
    test_path, _ = _write_split(tmp_path, "toy.test.jsonl", 6)
    _write_split(tmp_path, "toy.train.jsonl", 6)
    png = tmp_path / "out.png"
    # When
    out = _run_cli(capsys, ["--data", str(test_path), "--json", "--plot", str(png)], tiny_settings)
    # Then one JSON object with the promised keys, all consistent with the confusion matrix
    r = json.loads(out)
    for key in ("accuracy", "macro_f1", "positive_rate", "ece", "messages_per_second", "n", "baseline_accuracy"):
        assert key in r
    _check_consistent(r, 12)
    assert r["method"] == "prompt" and r["messages_per_second"] > 0
    # the baseline ran on the same 12 messages; trained on these very texts it gets most of them right
    b = r["baseline"]
    assert r["baseline_accuracy"] == b["accuracy"] == pytest.approx(
        (b["confusion_matrix"][0][0] + b["confusion_matrix"][1][1]) / 12
    )
    assert b["accuracy"] >= 0.75 and r["baseline_train_n"] == 12
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_harness_reads_csv_with_a_limit_and_prints_a_text_report(tmp_path, capsys, tiny_settings):
    path = tmp_path / "toy.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["body", "sentiment"])
        for t in POS_TEXTS:
            w.writerow([t, "positive"])
        for t in NEG_TEXTS:
            w.writerow([t, "negative"])
    args = ["--data", str(path), "--format", "csv", "--text-field", "body", "--label-field", "sentiment"]
    r = json.loads(_run_cli(capsys, [*args, "--limit", "8", "--json"], tiny_settings))
    _check_consistent(r, 8)
    assert sum(r["confusion_matrix"][0]) == sum(r["confusion_matrix"][1]) == 4  # balanced subset
    assert "baseline_accuracy" not in r  # no train split beside a CSV
    text = _run_cli(capsys, [*args, "--limit", "8"], tiny_settings)
    assert "accuracy" in text and "messages/s" in text


def test_harness_matches_engine_classify(tiny_engine):
    # The harness reads the same sentiments as Engine.classify, the worker's code path.
    ex = [Example(t, P) for t in POS_TEXTS] + [Example(t, N) for t in NEG_TEXTS]
    r = ev.run(tiny_engine, ex)
    preds = [s.label for s in tiny_engine.classify([e.text for e in ex])]
    assert r["confusion_matrix"] == ev.confusion_matrix([e.label for e in ex], preds)


# ---------------------------------------------------------------------------------------------- a real model
# SmolLM2-135M answers "Positive" to every message with this prompt (measured: accuracy 0.50, every message
# predicted positive), but its label-logit difference still ranks the messages better than chance (measured AUC
# 0.578 on these 100, float32; 0.626 on all 400 en dev). The floors catch a harness, prompt or label-reading
# regression that destroys the ranking; the Qwen-sized results are in docs/evaluation.md.
SMOLLM2_ACCURACY_FLOOR = 0.5
SMOLLM2_AUC_FLOOR = 0.55


@pytest.mark.slow
def test_smollm2_on_100_balanced_english_dev_messages_stays_above_its_floor(capsys):
    """The harness on a real instruction-tuned model (SmolLM2-135M) and the shared English dev split.

    Measured values and floors: see SMOLLM2_ACCURACY_FLOOR and SMOLLM2_AUC_FLOOR above.
    """
    from pathlib import Path

    from worker.testing import PROJECT_ROOT, smollm2_path

    gguf = smollm2_path()
    data = PROJECT_ROOT.parent / "shared" / "data" / "sentiment-en.dev.jsonl"
    if gguf is None or not data.is_file():
        pytest.skip("SmolLM2 GGUF or the shared sentiment data not available")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALLINONE_DTYPE", "float32")
        assert ev.main(["--data", str(data), "--limit", "100", "--model", str(gguf), "--json", "--no-baseline"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n"] == 100 and Path(r["model"]).name == Path(gguf).name
    assert r["accuracy"] >= SMOLLM2_ACCURACY_FLOOR and r["auc"] >= SMOLLM2_AUC_FLOOR, r
