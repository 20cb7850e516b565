"""Every error of the product. One base class; "retry later" kept apart from "give up".

Tasks retry a :class:`TransientError` with backoff and record a :class:`PermanentError` on the turn (or in the
dead-letter list) without retrying it.
"""

from __future__ import annotations


class AllInOneError(Exception):
    """Base of every error this product raises on purpose."""


class TransientError(AllInOneError):
    """Something outside us failed and may work later: retry with backoff."""


class PermanentError(AllInOneError):
    """The input or the configuration is wrong: retrying cannot help."""


class StoreUnavailable(TransientError):
    """Redis (broker or results store) did not answer within the retry bound."""


class NotReady(TransientError):
    """An earlier turn of the conversation is not finished yet: this reply must wait."""


class InvalidMessage(PermanentError, ValueError):
    """A message or a task payload is malformed: empty, too long, wrong type, bad id."""


class UnknownConversation(PermanentError, KeyError):
    """No conversation with this id is stored (never created, or expired)."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain sentence
        return str(self.args[0]) if self.args else "unknown conversation"


class UnknownMessage(PermanentError, KeyError):
    """No turn with this message id is stored (never created, or expired)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown message"


class MessageIdConflict(PermanentError):
    """A message id was submitted again with another conversation or text."""


class ModelLoadError(PermanentError):
    """The model or its tokenizer could not be loaded from the configured place."""


class HeadError(ModelLoadError):
    """A sentiment head file is missing, malformed, or does not fit the loaded model."""


class AdapterError(ModelLoadError):
    """A sentiment adapter file is missing, malformed, or does not fit the loaded model."""


class WaitTimeout(AllInOneError, TimeoutError):
    """``Producer.wait`` gave up before the turn finished."""


class TurnFailed(AllInOneError):
    """The turn ended in status ``failed``; its reason is the message."""
