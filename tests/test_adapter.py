"""The sentiment adapter on the tiny model: trained a few steps it changes sentiment, never replies; it saves,
loads, combines with a head trained on its states, and is refused when it does not fit the loaded model."""

from __future__ import annotations

import json

import pytest
import torch

from worker.engine import Engine
from worker.engine.adapter import LoRA, SentimentAdapter
from worker.errors import AdapterError, HeadError
from worker.tools import train_adapter, train_head
from worker.tools.datasets import Example

# Two disjoint vocabularies: a task the tiny (random) model can be taught in a few steps.
POS = [f"great lovely clean friendly {i}" for i in range(12)]
NEG = [f"dirty noisy terrible never {i}" for i in range(12)]
TOY = [Example(t, "positive") for t in POS] + [Example(t, "negative") for t in NEG]


@pytest.fixture(scope="module")
def engine(tiny_settings):
    """An engine of this module's own (the tests switch adapters on it)."""
    e = Engine(tiny_settings)
    e.load()
    return e


@pytest.fixture(scope="module")
def trained(engine, tmp_path_factory):
    """An adapter trained for a few steps on the toy set, saved; the engine is left without it."""
    before = engine.score(POS + NEG).label_logits.clone()
    adapter, history = train_adapter.train_adapter(
        engine, TOY, TOY[::3], epochs=6, layers=2, batch_size=4, lr=1e-2, checks_per_epoch=1, patience=10,
        progress=False)
    after = engine.score(POS + NEG).label_logits.clone()
    path = adapter.save(tmp_path_factory.mktemp("adapter") / "adapter.safetensors")
    engine.use_adapter(None)
    return adapter, path, before, after, history


def test_a_fresh_adapter_changes_nothing(engine):
    # Given a new adapter (B starts at zero); When the engine scores with it; Then the scores are the model's own
    before = engine.score(POS[:3] + NEG[:3]).label_logits
    engine.use_adapter(SentimentAdapter.create(engine.model, (0, 1), rank=4))
    try:
        assert torch.allclose(engine.score(POS[:3] + NEG[:3]).label_logits, before, atol=1e-6)
    finally:
        engine.use_adapter(None)


def test_a_few_training_steps_change_the_sentiment_scores_and_lower_the_dev_loss(trained, engine):
    adapter, _, before, after, history = trained
    assert (after - before).abs().max().item() > 0.05
    assert min(d["loss"] for d in history["dev"][1:]) < history["dev"][0]["loss"]
    assert adapter.meta["model"] == engine.identity.as_dict() and adapter.meta["steps"] > 0
    # and the engine without it scores as before
    assert torch.allclose(engine.score(POS + NEG).label_logits, before, atol=1e-6)


def test_greedy_replies_are_byte_identical_with_the_adapter_loaded(trained, engine, tiny_settings):
    _, path, _, _, _ = trained
    adapted = Engine(tiny_settings.model_copy(update={"sentiment_adapter": path}))
    adapted.load()
    assert adapted.adapter is not None and adapted.classify(["great"])[0].method == "prompt+adapter"
    for history, text in [([], "hello"), ([("hi", "hello")], "how are you?"), ([], "服务很好吗？")]:
        ids, _ = engine.reply_prompt_ids(history, text)
        new = adapted.replier.generate(ids, adapted.settings)
        assert torch.equal(new, engine.replier.generate(ids, engine.settings))
        assert adapted.reply(history, text).text.encode() == engine.reply(history, text).text.encode()
    # The check can fail: with the adapter switched on, the same reply prompt gives other logits.
    ids, _ = engine.reply_prompt_ids([], "hello")
    with torch.inference_mode():
        plain = adapted.model(input_ids=ids).logits
        with adapted.adapter.active():
            on = adapted.model(input_ids=ids).logits
        again = adapted.model(input_ids=ids).logits
    assert not torch.allclose(plain, on) and torch.equal(plain, again)


def test_active_puts_the_wrappers_in_and_the_very_modules_back(trained, tiny_settings):
    _, path, _, _, _ = trained
    adapted = Engine(tiny_settings.model_copy(update={"sentiment_adapter": path}))
    adapted.load()
    adapter, model = adapted.adapter, adapted.model
    original = {n: model.get_submodule(n) for n in adapter.names}
    with adapter.active():
        inside = {n: model.get_submodule(n) for n in adapter.names}
        with adapter.active():  # re-entrant: the inner exit leaves the wrappers in
            pass
        assert all(model.get_submodule(n) is inside[n] for n in adapter.names)
    assert all(isinstance(w, LoRA) and w.base is original[n] for n, w in inside.items())
    assert all(model.get_submodule(n) is original[n] for n in adapter.names)


def test_save_and_load_round_trip(trained, tiny_settings):
    adapter, path, _, after, _ = trained
    again = SentimentAdapter.load(path)
    assert again.names == adapter.names and again.rank == adapter.rank and again.fingerprint == adapter.fingerprint
    assert path.stat().st_size < adapter.nbytes + 16_000 and again.meta["prompt"] == adapter.meta["prompt"]
    loaded = Engine(tiny_settings.model_copy(update={"sentiment_adapter": path}))
    loaded.load()
    assert torch.allclose(loaded.score(POS + NEG).label_logits, after, atol=1e-5)
    # the plain reference path runs with the adapter too
    assert torch.allclose(loaded.score_plain(POS[0]).label_logits, after[:1], atol=1e-4)


def test_an_engine_keeps_a_loaded_adapter_once_in_its_activations_dtype(trained, tiny_settings):
    adapter, path, _, _, _ = trained
    # Given the adapter file loaded as a bf16 engine holds it
    half = SentimentAdapter.load(path, dtype=torch.bfloat16)
    assert {t.dtype for t in half.parameters()} == {torch.bfloat16}
    assert half.nbytes * 2 == adapter.nbytes and half.fingerprint == adapter.fingerprint
    # When a bf16 engine loads the file, and the same engine scores with the float32 adapter object instead
    bf16 = Engine(tiny_settings.model_copy(update={"sentiment_adapter": path, "dtype": "bfloat16"}))
    bf16.load()
    assert {t.dtype for t in bf16.adapter.parameters()} == {torch.bfloat16}
    held = bf16.score(POS + NEG).label_logits.clone()
    bf16.use_adapter(SentimentAdapter.load(path))
    # Then the scores are the same numbers (the float32 matrices are cast to bf16 for the pass either way)
    assert torch.allclose(bf16.score(POS + NEG).label_logits, held, atol=1e-3)
    bf16.use_adapter(None)
    assert not torch.allclose(bf16.score(POS + NEG).label_logits, held, atol=1e-2)


def test_training_goes_on_from_a_saved_adapter(trained, engine, tmp_path):
    adapter, path, _, _, _ = trained
    saved = SentimentAdapter.load(path)
    # When training starts from the saved adapter (its layers and rank, not the arguments')
    more, history = train_adapter.train_adapter(
        engine, TOY, TOY[::3], epochs=1, layers=1, rank=2, batch_size=4, lr=1e-3, progress=False, init=saved)
    engine.use_adapter(None)
    # Then its first dev check is the saved adapter's own, and the result is another adapter of the same shape
    engine.use_adapter(saved)
    with torch.no_grad():
        start = train_adapter.dev_metrics(*train_adapter.dev_logits(engine, TOY[::3]))
    engine.use_adapter(None)
    assert history["dev"][0]["loss"] == pytest.approx(start["loss"], abs=1e-5)
    assert more.names == saved.names and more.rank == saved.rank and more.meta["layers"] == adapter.meta["layers"]
    assert more.meta["init"]["fingerprint"] == saved.fingerprint and more.fingerprint != saved.fingerprint
    assert saved.fingerprint == adapter.fingerprint  # the saved one was not trained in place
    # and an adapter of another model is refused before any step
    other = SentimentAdapter.load(_edited(path, tmp_path, meta={"model": {"name": "x", "fingerprint": "f" * 16}}))
    with pytest.raises(AdapterError, match="trained on x"):
        train_adapter.train_adapter(engine, TOY, TOY[::3], epochs=1, progress=False, init=other)


def _edited(path, tmp_path, meta=None, tensors=None):
    """A copy of the adapter file at ``path`` with its metadata or tensors changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        md = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if meta:
        md["meta"] = json.dumps(json.loads(md["meta"]) | meta)
    t = tensors(t) if tensors else t
    out = tmp_path / "edited.safetensors"
    save_file(t, str(out), metadata=md)
    return out


def test_an_adapter_of_another_model_is_refused(trained, tiny_settings, tmp_path):
    _, path, _, _, _ = trained
    other = _edited(path, tmp_path, meta={"model": {"name": "another model", "fingerprint": "0123456789abcdef"}})
    with pytest.raises(AdapterError, match="trained on another model .0123456789abcdef. but .*train_adapter"):
        Engine(tiny_settings.model_copy(update={"sentiment_adapter": other})).load()


def test_an_adapter_of_other_shapes_is_refused(trained, tiny_settings, tmp_path):
    _, path, _, _, _ = trained
    # Given matrices one column wider than the projections they claim (a damaged or hand-made file)
    wide = _edited(path, tmp_path, tensors=lambda t: {
        k: torch.cat([v, v[:, :1]], 1) if k.endswith(".lora_a") else v for k, v in t.items()})
    with pytest.raises(AdapterError, match=r"is \d+ -> \d+ but the loaded model's is"):
        Engine(tiny_settings.model_copy(update={"sentiment_adapter": wide})).load()
    # and an adapter of layers this model does not have
    deep = _edited(path, tmp_path, tensors=lambda t: {k.replace("layers.1.", "layers.7."): v for k, v in t.items()})
    with pytest.raises(AdapterError, match="which the loaded model does not have"):
        Engine(tiny_settings.model_copy(update={"sentiment_adapter": deep})).load()


def test_a_missing_or_foreign_file_is_refused(tiny_settings, tmp_path):
    with pytest.raises(AdapterError, match="names no file"):
        SentimentAdapter.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="is not a sentiment adapter file"):
        SentimentAdapter.load(tmp_path / "junk.safetensors")


def test_a_head_trained_on_the_adapter_states_combines_with_it(trained, tiny_settings, tmp_path):
    _, path, _, _, _ = trained
    adapted = Engine(tiny_settings.model_copy(update={"sentiment_adapter": path}))
    adapted.load()
    head = train_head.train_head(adapted, TOY, ("hidden", "logits"))
    assert head.meta["adapter"] == adapted.adapter.fingerprint
    head_path = head.save(tmp_path / "head.safetensors")
    both = Engine(tiny_settings.model_copy(update={"sentiment_adapter": path, "sentiment_head": head_path}))
    both.load()
    assert {s.method for s in both.classify(POS[:2] + NEG[:2])} == {"prompt+adapter+head"}
    # The same head without the adapter reads other states: refused
    with pytest.raises(HeadError, match="states of the sentiment adapter .* runs with no sentiment adapter"):
        Engine(tiny_settings.model_copy(update={"sentiment_head": head_path})).load()
    # and switching the adapter off drops it
    both.use_adapter(None)
    assert both.head is None


class Opaque(torch.nn.Module):
    """A projection that is not an nn.Linear and whose op has no backward (as packed or weight-only int kernels)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.weight = linear.in_features, linear.out_features, linear.weight

    def forward(self, x):
        return (x.detach() @ self.weight.detach().T).requires_grad_(False)


def test_lora_wraps_any_projection_and_trains_through_one_without_a_backward():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5, bias=False).requires_grad_(False)
    a, b = torch.nn.Parameter(torch.randn(2, 6)), torch.nn.Parameter(torch.randn(5, 2))
    x = torch.randn(3, 6, requires_grad=True)
    grads = []
    for base in (lin, Opaque(lin)):
        x.grad = None
        y = LoRA(base, a, b, scale=0.5)(x)
        assert torch.allclose(y, lin(x) + 0.5 * (x @ a.T) @ b.T, atol=1e-6)
        y.square().sum().backward()
        grads.append(x.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_the_trainer_command_runs_end_to_end(tmp_path, tiny_settings, monkeypatch, capsys):
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in TOY), encoding="utf-8")
    for k, v in {"ALLINONE_MODEL": tiny_settings.model, "ALLINONE_DTYPE": "float32", "ALLINONE_THREADS": "1",
                 "ALLINONE_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    out, hist, png = tmp_path / "a.safetensors", tmp_path / "h.json", tmp_path / "curve.png"
    args = ["--train", str(data), "--dev", str(data), "--limit", "16", "--epochs", "2", "--layers", "1", "--rank", "2",
            "--batch-size", "4", "--seed", "3", "--out", str(out), "--history", str(hist), "--plot", str(png),
            "--no-progress"]
    assert train_adapter.main(args) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["bytes"] == out.stat().st_size and info["train_n"] == 16 and info["layers"] == [1]
    assert png.stat().st_size > 0 and len(json.loads(hist.read_text())["dev"]) == 3
    # deterministic: the same command gives the same adapter
    again = tmp_path / "b.safetensors"
    assert train_adapter.main([*args[:-7], "--out", str(again), "--no-progress"]) == 0
    assert SentimentAdapter.load(again).fingerprint == SentimentAdapter.load(out).fingerprint == info["fingerprint"]


def test_every_check_that_lowers_the_dev_loss_leaves_the_best_adapter_so_far_on_disk(engine, tmp_path):
    out = tmp_path / "run.safetensors"
    saved: list[SentimentAdapter] = []

    def checkpoint(best: SentimentAdapter) -> None:
        best.save(out)
        saved.append(SentimentAdapter.load(out))

    adapter, history = train_adapter.train_adapter(
        engine, TOY, TOY[::3], epochs=6, layers=2, batch_size=4, lr=1e-2, checks_per_epoch=1, patience=10,
        progress=False, checkpoint=checkpoint)
    engine.use_adapter(None)
    losses = [d["loss"] for d in history["dev"]]
    lowered = [d["step"] for i, d in enumerate(history["dev"][1:], 1) if d["loss"] < min(losses[:i])]
    # Then one file a new best, at its step, not yet calibrated; the last is the kept adapter's matrices
    assert lowered and [c.meta["checkpoint"]["step"] for c in saved] == lowered
    assert all(c.label_offset == 0.0 for c in saved) and adapter.label_offset != 0.0
    last = saved[-1]
    assert all(torch.equal(last.a[n], adapter.a[n].detach().float()) for n in adapter.names)
    assert all(torch.equal(last.b[n], adapter.b[n].detach().float()) for n in adapter.names)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # written beside, renamed over: nothing half-written


def test_the_harness_scores_prompt_head_adapter_and_adapter_head_in_one_run(trained, engine, tmp_path, monkeypatch,
                                                                           capsys, tiny_settings):
    from worker.tools import evaluate

    _, path, _, _, _ = trained
    data = tmp_path / "toy.test.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in TOY), encoding="utf-8")
    # Given a head on the model's own states and one on the adapter's
    head = train_head.train_head(engine, TOY).save(tmp_path / "head.safetensors")
    engine.use_adapter(path)
    try:
        adapter_head = train_head.train_head(engine, TOY).save(tmp_path / "adapter-head.safetensors")
    finally:
        engine.use_adapter(None)
    for k, v in {"ALLINONE_MODEL": tiny_settings.model, "ALLINONE_DTYPE": "float32", "ALLINONE_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    # When the harness runs with both heads and the adapter
    rows = tmp_path / "rows.jsonl"
    assert evaluate.main(["--data", str(data), "--no-baseline", "--json", "--head", str(head), "--adapter", str(path),
                          "--adapter-head", str(adapter_head), "--predictions", str(rows)]) == 0
    r = json.loads(capsys.readouterr().out)
    # Then the four are measured on the same messages, each with its own speed
    v = r["variants"]
    assert list(v) == ["prompt+head", "prompt", "prompt+adapter+head", "prompt+adapter"]
    assert all(m["n"] == len(TOY) and m["messages_per_second"] > 0 for m in v.values())
    assert v["prompt+adapter"]["accuracy"] > v["prompt"]["accuracy"]
    # and every message's four predictions are written, each method's right answers adding up to its accuracy
    written = [json.loads(line) for line in rows.read_text(encoding="utf-8").splitlines()]
    assert [w["text"] for w in written] == [e.text for e in TOY]
    for name, m in v.items():
        assert sum(w[name]["correct"] for w in written) == round(m["accuracy"] * len(TOY))
    # and the text report shows them all
    png = tmp_path / "p.png"
    assert evaluate.main(["--data", str(data), "--no-baseline", "--adapter", str(path), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "prompt+adapter" in text and "  prompt " in text and png.stat().st_size > 0


def test_the_label_offset_is_the_log_loss_minimum_of_a_known_shift():
    # Given logits whose labels were drawn with the positive logit 0.8 too low
    gen = torch.Generator().manual_seed(0)
    d = torch.randn(4000, generator=gen) * 2
    y = (torch.rand(4000, generator=gen) >= torch.sigmoid(d + 0.8)).long()  # 0 = positive
    logits = torch.stack([d / 2, -d / 2], dim=1)
    # When the offset is fitted; Then it finds the shift, and lowers the log-loss
    offset = train_adapter.fit_label_offset(logits, y)
    assert offset == pytest.approx(0.8, abs=0.15)
    assert train_adapter.dev_metrics(logits, y, offset)["loss"] < train_adapter.dev_metrics(logits, y)["loss"]


def test_the_trainer_calibrates_and_the_engine_adds_the_offset_to_the_positive_logit(trained, engine, tiny_settings):
    adapter, path, _, after, _ = trained
    assert adapter.label_offset != 0 and adapter.meta["label_offset"] == adapter.label_offset
    assert adapter.meta["calibrated"]["loss"] <= adapter.meta["best"]["loss"] + 1e-6
    assert adapter.meta["calibrated"]["dev_n"] == len(TOY[::3])
    loaded = SentimentAdapter.load(path)
    assert loaded.label_offset == adapter.label_offset and loaded.fingerprint == adapter.fingerprint
    # the same matrices without the offset: the negative logit is the same, the positive one lower by the offset
    engine.use_adapter(loaded)
    with_offset = engine.score(POS + NEG).label_logits.clone()
    loaded.label_offset = 0.0
    bare = engine.score(POS + NEG).label_logits.clone()
    engine.use_adapter(None)
    assert torch.allclose(with_offset, after, atol=1e-5)
    assert torch.allclose(with_offset[:, 1], bare[:, 1]) and torch.allclose(
        with_offset[:, 0] - bare[:, 0], torch.full((len(POS + NEG),), adapter.label_offset), atol=1e-5)
    assert loaded.fingerprint != adapter.fingerprint  # a head reading the logits must not take one for the other


def test_epochs_0_only_checks_and_calibrates_a_saved_adapter(trained, tmp_path, tiny_settings, monkeypatch, capsys):
    adapter, path, _, _, _ = trained
    bare = SentimentAdapter.load(path)
    bare.label_offset = 0.0
    start = bare.save(tmp_path / "bare.safetensors")
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in TOY[::3]),
                    encoding="utf-8")
    for k, v in {"ALLINONE_MODEL": tiny_settings.model, "ALLINONE_DTYPE": "float32", "ALLINONE_THREADS": "1",
                 "ALLINONE_CACHE_DIR": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "calibrated.safetensors"
    assert train_adapter.main(["--init", str(start), "--epochs", "0", "--dev", str(data), "--out", str(out),
                               "--no-progress"]) == 0
    got = SentimentAdapter.load(out)
    assert all(torch.equal(got.a[n], bare.a[n]) and torch.equal(got.b[n], bare.b[n]) for n in bare.names)
    assert got.label_offset == pytest.approx(adapter.label_offset, abs=1e-3)
    # it keeps the record of its training (not the defaults of a run that trained nothing)
    assert got.meta["steps"] == adapter.meta["steps"] > 0 and got.meta["lr"] == adapter.meta["lr"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_adapter.main(["--epochs", "0", "--out", str(out)])
    assert "needs --init" in capsys.readouterr().err


def test_an_adapter_whose_label_offset_is_not_a_number_is_refused(trained, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, path, _, _, _ = trained
    with safe_open(str(path), framework="pt") as f:
        md, t = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for bad, match in [("nope", "not a number"), ("nan", "offset is nan")]:
        save_file(t, str(tmp_path / "bad.safetensors"), metadata=md | {"label_offset": bad})
        with pytest.raises(AdapterError, match=match):
            SentimentAdapter.load(tmp_path / "bad.safetensors")
