"""``python -m worker.train_head``: a head trained from the engine's own forward pass, stamped with the model's
identity and the prompt's fingerprint, that the engine then loads."""

from __future__ import annotations

import json

import pytest

from worker.engine import Engine
from worker.engine.head import SentimentHead
from worker.errors import HeadError
from worker.prompts import prompt_fingerprint
from worker.tools import train_head

# Two disjoint vocabularies: the tiny (random) model's last-token states of the two groups differ systematically.
POS = [f"great lovely clean friendly {i}" for i in range(12)] + ["服务很好，房间干净。", "很满意，下次还来。"] * 3
NEG = [f"dirty noisy terrible never {i}" for i in range(12)] + ["房间太小，隔音很差。", "不推荐，很失望。"] * 3


@pytest.fixture()
def train_file(tmp_path, tiny_settings, monkeypatch):
    rows = [{"text": t, "label": "positive"} for t in POS] + [{"text": t, "label": "negative"} for t in NEG]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setenv("ALLINONE_MODEL", tiny_settings.model)
    monkeypatch.setenv("ALLINONE_DTYPE", "float32")
    monkeypatch.setenv("ALLINONE_THREADS", "1")
    return data


def test_train_head_cli_trains_a_head_the_engine_loads(train_file, tiny_settings, tmp_path, capsys):
    # Given labelled messages; When a head is trained on a balanced 30 of them
    out = tmp_path / "h.safetensors"
    assert train_head.main(["--train", str(train_file), "--out", str(out), "--limit", "30"]) == 0
    # Then it reports what it wrote, and records the model it belongs to and the prompt its features come from
    info = json.loads(capsys.readouterr().out)
    assert info["train_n"] == 30 and info["train_positive"] == 15 and info["bytes"] == out.stat().st_size
    engine = Engine(tiny_settings.model_copy(update={"sentiment_head": out}))
    engine.load()
    meta = SentimentHead.load(out).meta
    assert meta["prompt"] == prompt_fingerprint() and meta["model"] == engine.identity.as_dict()
    # and the engine classifies with it
    assert engine.head is not None and engine.classify(["great lovely"])[0].method == "prompt+head"


def test_train_head_reads_an_inner_layer_by_name_and_refuses_an_unknown_feature(train_file, tmp_path):
    out = tmp_path / "h2.safetensors"
    assert train_head.main(["--train", str(train_file), "--out", str(out), "--features", "layer1,logits",
                            "--c", "0.1"]) == 0
    head = SentimentHead.load(out)
    assert head.layers == (1,) and head.dim == head.hidden_size + 2 and head.meta["c"] == 0.1
    with pytest.raises(HeadError, match="unknown head feature 'middle'"):
        train_head.main(["--train", str(train_file), "--out", str(out), "--features", "middle"])
