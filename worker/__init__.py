"""The worker side: settings, store, engine and the Celery tasks over them.

Importing this package is cheap and never imports torch: the producer uses ``worker.settings``,
``worker.schemas``, ``worker.store`` and ``worker.errors``. The engine (torch) is imported by the worker process
only.
"""
