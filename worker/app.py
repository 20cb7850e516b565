"""The Celery application. Tasks are registered by name, so producers send them without importing this module's
tasks (and torch) at all."""

from __future__ import annotations

from celery import Celery

app = Celery("allinone", include=["worker.tasks"])
app.config_from_object("celeryconfig")
