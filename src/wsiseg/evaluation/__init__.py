"""``wsiseg-eval``: a ``wsiseg-predict`` run scored against ground-truth annotations. The run and its command line:
:mod:`~wsiseg.evaluation.evaluate`; the metrics: :mod:`~wsiseg.evaluation.metrics`; reading the run:
:mod:`~wsiseg.evaluation.predictions`; the printed table and ``froc.png``: :mod:`~wsiseg.evaluation.summary`."""
