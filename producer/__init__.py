"""The producer side: a library for web backends and a CLI (``python -m producer``). No torch here."""

from producer.client import Producer

__all__ = ["Producer"]
