"""A sentiment head: logistic regression on the features the engine already computes for the prompt.

The sentiment prompt's forward pass ends in a final hidden state at the message's last token; the prompt reads
just two rows of the LM head from it. A head reads the whole state (and, optionally, the two label logits and the
states of inner layers at the same token), standardised with the train statistics, through one trained linear
layer: a classifier-grade probe at the cost of one dot product, on the same forward pass, with the one model in
memory. ``python -m worker.train_head`` trains it.

Features: ``hidden`` (final, normed state), ``logits`` (the two label logits), ``layerN`` (the residual stream after
decoder layer N). Middle layers carry more of a message's sentiment than the last one, which is shaped for
predicting the next token.

On disk: one safetensors file (weight, bias, mean, std; float32; a few KB) whose metadata names the features, the
hidden size, and in ``meta`` the model it was trained on (``"model"``: its identity, ``{"name", "fingerprint"}``,
see :mod:`worker.engine.identity`) and the sentiment prompt's fingerprint (``"prompt"``,
:func:`worker.prompts.prompt_fingerprint`). The engine refuses a head whose model or prompt is not the loaded one:
its features would mean something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from worker.errors import HeadError

if TYPE_CHECKING:
    from worker.engine.identity import ModelIdentity

FIX = "train a head for this model with python -m worker.train_head, or unset ALLINONE_SENTIMENT_HEAD"


def layer_of(name: str) -> int | None:
    """N for a ``layerN`` feature, None for the others."""
    if name.startswith("layer") and name[5:].isdigit() and int(name[5:]) >= 1:
        return int(name[5:])
    return None


def check_features(features: tuple[str, ...]) -> tuple[str, ...]:
    if not features:
        raise HeadError("a sentiment head needs at least one feature")
    for name in features:
        if name not in ("hidden", "logits") and layer_of(name) is None:
            raise HeadError(f"unknown head feature {name!r}; known: hidden, logits, layerN (N >= 1)")
    if len(set(features)) != len(features):
        raise HeadError(f"a head feature is named twice: {','.join(features)}")
    return features


def feature_layers(features: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(n for n in (layer_of(f) for f in features) if n is not None)


def feature_matrix(scores: Any, features: tuple[str, ...]) -> torch.Tensor:
    """The head's input from engine scores: the chosen features side by side, float32, [B, D]."""
    parts = []
    for name in check_features(features):
        if name == "hidden":
            parts.append(scores.hidden.float())
        elif name == "logits":
            parts.append(scores.label_logits.float())
        else:
            n = layer_of(name)
            if n not in scores.layers:
                raise HeadError(f"the engine's scores hold no state of layer {n} (score with layers=({n},))")
            parts.append(scores.layers[n].float())
    return torch.cat(parts, dim=1)


def feature_dim(features: tuple[str, ...], hidden_size: int) -> int:
    return sum(2 if f == "logits" else hidden_size for f in features)


@dataclass
class SentimentHead:
    """P(positive) = sigmoid(((x - mean) / std) . weight + bias), x the engine's features of a message."""

    weight: torch.Tensor  # [D]
    bias: float
    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]
    hidden_size: int
    features: tuple[str, ...] = ("hidden",)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def layers(self) -> tuple[int, ...]:
        """The inner layers whose states this head reads."""
        return feature_layers(self.features)

    # ---------------------------------------------------------------------------------------- inference
    def check_model(self, *, identity: ModelIdentity, prompt: str, hidden_size: int, num_layers: int,
                    adapter: str | None = None) -> None:
        """Refuse a head trained on another model (``identity``: the loaded model's ``ModelIdentity``), under
        another sentiment prompt (``prompt``: its fingerprint), on the states of another sentiment adapter or
        none (``adapter``: the loaded one's fingerprint), or for another shape, saying what to do."""
        trained_on = self.meta.get("model")
        if not (isinstance(trained_on, dict) and trained_on.get("fingerprint")):
            was = f", naming {trained_on!r}" if trained_on else ""
            raise HeadError(
                f"the sentiment head records no model identity (an older head format{was}): retrain it for "
                f"{identity.name} with python -m worker.train_head, or unset ALLINONE_SENTIMENT_HEAD"
            )
        name = trained_on.get("name", "an unnamed model")
        if trained_on["fingerprint"] != identity.fingerprint:
            raise HeadError(
                f"the sentiment head was trained on {name} [{trained_on['fingerprint']}] but the loaded model is "
                f"{identity.name} [{identity.fingerprint}]: {FIX}"
            )
        if self.meta.get("prompt") != prompt:
            raise HeadError(
                f"the sentiment head was trained under the sentiment prompt {self.meta.get('prompt')!r} but this "
                f"engine's prompt is {prompt!r} (its instruction, label words or few-shot turns changed): {FIX}"
            )
        if self.meta.get("adapter") != adapter:
            def said(fp: Any) -> str:
                return f"the sentiment adapter [{fp}]" if fp else "no sentiment adapter"
            raise HeadError(
                f"the sentiment head was trained on the states of {said(self.meta.get('adapter'))} but this engine "
                f"runs with {said(adapter)}: train the head with the adapter the worker uses "
                "(python -m worker.train_head --adapter), or unset ALLINONE_SENTIMENT_HEAD")
        if hidden_size != self.hidden_size:
            raise HeadError(
                f"the sentiment head expects hidden size {self.hidden_size} ({name}) but the loaded model has "
                f"{hidden_size}: {FIX}"
            )
        deep = [n for n in self.layers if n > num_layers]
        if deep:
            raise HeadError(f"the sentiment head reads layer {deep[0]} ({name}) but the loaded model has "
                            f"{num_layers} layers: {FIX}")

    def logit(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise HeadError(f"the sentiment head takes {self.dim} features, got {x.shape[-1]}")
        return ((x.float() - self.mean) / self.std) @ self.weight + self.bias

    def p_positive(self, scores: Any) -> torch.Tensor:
        """P(positive) of each message of a batch of engine scores, [B]."""
        return torch.sigmoid(self.logit(feature_matrix(scores, self.features)))

    # ---------------------------------------------------------------------------------------- training
    @classmethod
    def fit(
        cls,
        x: torch.Tensor,
        positive: torch.Tensor,
        hidden_size: int,
        features: tuple[str, ...] = ("hidden",),
        c: float | None = None,
        meta: dict[str, Any] | None = None,
    ) -> SentimentHead:
        """Logistic regression on standardised features. ``positive``: 1 for positive, 0 for negative.

        Without ``c`` the inverse regularisation strength is chosen by 5-fold cross-validated log-loss, which
        also keeps the probabilities calibrated. ``meta`` must name what the engine checks at load:
        ``{"model": engine.identity.as_dict(), "prompt": prompt_fingerprint(engine.few_shot)}``."""
        import numpy as np
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import StratifiedKFold

        xs = x.double().numpy()
        y = positive.long().numpy()
        check_features(tuple(features))
        if x.shape[1] != feature_dim(tuple(features), hidden_size):
            raise HeadError(f"{x.shape[1]} feature columns do not match {','.join(features)} at width {hidden_size}")
        if len(set(y.tolist())) < 2:
            raise HeadError("a sentiment head needs examples of both labels")
        mean = xs.mean(0)
        std = xs.std(0) + 1e-6
        z = (xs - mean) / std
        if c is None:
            c, folds = 1.0, int(min(5, np.bincount(y).min()))
            if folds >= 2:
                best = np.inf
                for cand in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
                    loss = 0.0
                    for tr, va in StratifiedKFold(folds, shuffle=True, random_state=0).split(z, y):
                        p = LogisticRegression(C=cand, max_iter=3000).fit(z[tr], y[tr]).predict_proba(z[va])[:, 1]
                        p = np.clip(p, 1e-7, 1 - 1e-7)
                        loss -= float(np.sum(y[va] * np.log(p) + (1 - y[va]) * np.log(1 - p)))
                    if loss < best:
                        best, c = loss, cand
        lr = LogisticRegression(C=c, max_iter=3000).fit(z, y)
        info = dict(meta or {})
        info.update(c=c, train_n=int(len(y)), train_positive=int(y.sum()))
        return cls(
            weight=torch.tensor(lr.coef_[0], dtype=torch.float32),
            bias=float(lr.intercept_[0]),
            mean=torch.tensor(mean, dtype=torch.float32),
            std=torch.tensor(std, dtype=torch.float32),
            hidden_size=hidden_size,
            features=tuple(features),
            meta=info,
        )

    # ---------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {
            "weight": self.weight.float().contiguous(),
            "bias": torch.tensor([self.bias], dtype=torch.float32),
            "mean": self.mean.float().contiguous(),
            "std": self.std.float().contiguous(),
        }
        metadata = {
            "format": "allinone-sentiment-head/1",
            "hidden_size": str(self.hidden_size),
            "features": ",".join(self.features),
            "meta": json.dumps(self.meta),
        }
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SentimentHead:
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise HeadError(f"ALLINONE_SENTIMENT_HEAD names no file: {path} (train one: python -m worker.train_head)")
        try:
            with safe_open(str(path), framework="pt") as f:
                md = f.metadata() or {}
                t = {k: f.get_tensor(k) for k in ("weight", "bias", "mean", "std")}
        except Exception as e:
            raise HeadError(f"{path} is not a sentiment head file: {type(e).__name__}: {e}") from e
        if md.get("format") != "allinone-sentiment-head/1":
            raise HeadError(f"{path} is not a sentiment head file (format {md.get('format')!r})")
        head = cls(
            weight=t["weight"].float(),
            bias=float(t["bias"][0]),
            mean=t["mean"].float(),
            std=t["std"].float(),
            hidden_size=int(md["hidden_size"]),
            features=tuple(md["features"].split(",")),
            meta=json.loads(md.get("meta", "{}")),
        )
        try:
            check_features(head.features)
        except HeadError as e:
            raise HeadError(f"{path}: {e}") from e
        expected = feature_dim(head.features, head.hidden_size)
        if not (head.dim == expected == head.mean.shape[0] == head.std.shape[0]):
            raise HeadError(f"{path}: weight of {head.dim} features does not match {head.features}")
        return head
