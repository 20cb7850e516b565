"""The sentiment head: trained on the tiny model's own features, saved, loaded, refused when it does not fit."""

from __future__ import annotations

import pytest
import torch

from worker.engine import Engine
from worker.engine.head import SentimentHead, feature_matrix
from worker.errors import HeadError

# A synthetic task the tiny (random) model separates in its hidden state: the two "labels" are two disjoint
# vocabularies, so the last-token states of the two groups differ systematically.
POS = [f"great lovely clean friendly {i}" for i in range(12)] + ["服务很好，房间干净。", "很满意，下次还来。"] * 3
NEG = [f"dirty noisy terrible never {i}" for i in range(12)] + ["房间太小，隔音很差。", "不推荐，很失望。"] * 3


@pytest.fixture(scope="module")
def trained(tiny_engine):
    scores = tiny_engine.score(POS + NEG)
    y = torch.tensor([1] * len(POS) + [0] * len(NEG))
    x = feature_matrix(scores, ("hidden", "logits"))
    head = SentimentHead.fit(x, y, tiny_engine.hidden_size, ("hidden", "logits"), meta={"model": "tiny"})
    return head, scores, y


def test_head_separates_a_separable_set(trained, tiny_engine):
    head, scores, y = trained
    p = head.p_positive(scores)
    assert p.shape == (len(POS) + len(NEG),)
    assert ((p >= 0.5).long() == y).float().mean().item() == 1.0
    assert head.dim == tiny_engine.hidden_size + 2 and head.meta["train_n"] == len(y)


def test_save_load_round_trip_gives_identical_probabilities(trained, tmp_path):
    head, scores, _ = trained
    path = head.save(tmp_path / "head.safetensors")
    assert path.stat().st_size < 16_000  # a few KB
    again = SentimentHead.load(path)
    assert again.features == ("hidden", "logits") and again.hidden_size == head.hidden_size
    assert again.meta["model"] == "tiny"
    assert torch.equal(again.p_positive(scores), head.p_positive(scores))


def test_a_head_for_another_hidden_size_is_refused_with_a_clear_error(trained, tiny_settings, tmp_path):
    head, _, _ = trained
    wide = SentimentHead(
        weight=torch.zeros(head.hidden_size * 2), bias=0.0, mean=torch.zeros(head.hidden_size * 2),
        std=torch.ones(head.hidden_size * 2), hidden_size=head.hidden_size * 2, meta={"model": "a wider model"},
    )
    with pytest.raises(HeadError, match=r"hidden size 128 \(a wider model\) but the loaded model has 64"):
        wide.check_model(head.hidden_size, 2)
    path = wide.save(tmp_path / "wide.safetensors")
    with pytest.raises(HeadError, match="python -m worker.calibrate"):
        Engine(tiny_settings.model_copy(update={"sentiment_head": path})).load()


def test_missing_or_foreign_head_files_are_refused(tmp_path):
    with pytest.raises(HeadError, match="names no file"):
        SentimentHead.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a head")
    with pytest.raises(HeadError, match="not a sentiment head file"):
        SentimentHead.load(tmp_path / "junk.safetensors")


def test_engine_with_a_head_classifies_with_it(trained, tiny_settings, tmp_path):
    head, scores, y = trained
    path = head.save(tmp_path / "head.safetensors")
    # Given an engine whose settings name the head
    engine = Engine(tiny_settings.model_copy(update={"sentiment_head": path}))
    engine.load()
    # When it classifies
    out = engine.classify(POS + NEG)
    # Then the labels and confidences are the head's, and the method says so
    assert {s.method for s in out} == {"prompt+head"}
    p = head.p_positive(scores).tolist()
    assert [s.label for s in out] == ["positive" if q >= 0.5 else "negative" for q in p]
    assert [s.confidence for s in out] == pytest.approx([max(q, 1 - q) for q in p], abs=1e-5)
    assert [s.label for s in out] == ["positive"] * len(POS) + ["negative"] * len(NEG)


def test_a_head_on_inner_layers_is_trained_saved_and_used_by_the_engine(tiny_engine, tiny_settings, tmp_path):
    # Given a head reading layer 1's state beside the final one
    features = ("layer1", "hidden", "logits")
    scores = tiny_engine.score(POS + NEG, layers=(1,))
    y = torch.tensor([1] * len(POS) + [0] * len(NEG))
    head = SentimentHead.fit(feature_matrix(scores, features), y, tiny_engine.hidden_size, features)
    assert head.dim == 2 * tiny_engine.hidden_size + 2 and head.layers == (1,)
    path = head.save(tmp_path / "layers.safetensors")
    # When an engine loads it
    engine = Engine(tiny_settings.model_copy(update={"sentiment_head": path}))
    engine.load()
    assert engine.feature_layers == (1,)
    # Then its plain score() carries layer 1 and its labels are the head's on those features
    out = engine.classify(POS + NEG)
    p = head.p_positive(scores).tolist()
    assert [s.label for s in out] == ["positive" if q >= 0.5 else "negative" for q in p]
    assert [s.confidence for s in out] == pytest.approx([max(q, 1 - q) for q in p], abs=1e-5)
    assert ((torch.tensor(p) >= 0.5).long() == y).float().mean().item() == 1.0


def test_head_features_are_checked(trained, tiny_settings, tmp_path):
    head, scores, y = trained
    with pytest.raises(HeadError, match="unknown head feature 'layerX'"):
        feature_matrix(scores, ("layerX",))
    with pytest.raises(HeadError, match="no state of layer 1"):
        feature_matrix(scores, ("layer1",))  # scored without layers
    with pytest.raises(HeadError, match="do not match"):
        SentimentHead.fit(torch.zeros(4, 3), torch.tensor([0, 1, 0, 1]), 64, ("hidden",))
    # A head reading a layer deeper than the loaded model has is refused at load, with what to do
    deep = SentimentHead(weight=torch.zeros(head.hidden_size), bias=0.0, mean=torch.zeros(head.hidden_size),
                         std=torch.ones(head.hidden_size), hidden_size=head.hidden_size, features=("layer7",),
                         meta={"model": "a deeper model"})
    path = deep.save(tmp_path / "deep.safetensors")
    assert SentimentHead.load(path).layers == (7,)
    with pytest.raises(HeadError, match=r"reads layer 7 \(a deeper model\) but the loaded model has 2 layers"):
        Engine(tiny_settings.model_copy(update={"sentiment_head": path})).load()
