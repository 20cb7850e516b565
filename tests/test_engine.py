"""The engine's lifecycle on a tiny, locally built Qwen2 model loaded through the same from_pretrained path as a
user's model: cheap to construct, loaded once, refusing work before load, reporting what it loaded.

The two jobs have their own tests: test_sentiment.py and test_reply.py.
"""

from __future__ import annotations

import logging

import pytest

from worker.engine import Engine, LoadReport, ModelIdentity
from worker.errors import ModelLoadError
from worker.settings import Settings


def test_load_reports_what_it_loaded(tiny_engine, tiny_settings):
    r = tiny_engine.report
    assert isinstance(r, LoadReport)
    assert r.model == tiny_settings.model and r.dtype == "float32"
    assert r.threads == 1 and r.seconds > 0 and r.rss_bytes > 0 and r.weights_bytes > 0
    assert r.prefix_tokens > 10
    assert tiny_engine.load() is r  # a second load() is a no-op: the model is loaded once


def test_the_report_and_the_log_name_the_model_identity(tiny_settings, caplog):
    # Given a fresh engine
    engine = Engine(tiny_settings)
    # When it loads
    with caplog.at_level(logging.INFO, logger="worker.engine"):
        report = engine.load()
    # Then its identity is in the report (as plain JSON for the heartbeat) and in the "model loaded" line
    assert isinstance(engine.identity, ModelIdentity) and report.identity == engine.identity
    assert report.as_dict()["identity"] == engine.identity.as_dict()
    before, after = [r.getMessage() for r in caplog.records if "model" in r.getMessage()][:2]
    assert before.startswith("loading model") and "float32" in before and "1 threads" in before
    assert after.startswith("model loaded") and engine.identity.fingerprint in after and "RSS" in after


@pytest.mark.parametrize("policy, warned", [("PASSIVE", True), ("passive", True), ("ACTIVE", False), (None, False)])
def test_a_passive_openmp_wait_policy_is_warned_of_at_load(monkeypatch, caplog, policy, warned):
    import torch

    from worker.engine import cpu

    # Given the environment's OpenMP wait policy
    if policy is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    # When the engine sets its threads (to what they are: the process's threads stay as the suite has them)
    with caplog.at_level(logging.WARNING, logger="worker.engine.cpu"):
        cpu.set_threads(torch.get_num_threads())
    # Then only a passive policy, which halved reply decoding, is named in a warning
    assert ("OMP_WAIT_POLICY=PASSIVE" in caplog.text) == warned


def test_constructing_an_engine_loads_nothing(tiny_settings):
    engine = Engine(tiny_settings)
    assert not engine.loaded and engine.report is None and engine.model is None
    assert engine.model_id == tiny_settings.model


def test_missing_model_is_a_clear_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        Engine(Settings(model=str(tmp_path / "nope.gguf"))).load()
    with pytest.raises(ModelLoadError, match="ALLINONE_MODEL takes"):
        Engine(Settings(model=str(tmp_path / "empty-folder"), cache_dir=tmp_path)).load()


def test_classify_before_load_is_refused(tiny_settings):
    with pytest.raises(RuntimeError, match="load"):
        Engine(tiny_settings).classify(["x"])
    with pytest.raises(RuntimeError, match="load"):
        Engine(tiny_settings).reply([], "x")
    with pytest.raises(RuntimeError, match="load"):
        Engine(tiny_settings).identity  # noqa: B018
