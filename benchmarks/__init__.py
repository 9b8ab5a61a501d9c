"""The benchmarks of a source checkout: ``python -m benchmarks.cost`` (or ``python benchmarks/cost.py``),
``benchmarks.accuracy`` and ``benchmarks.update_docs``; ``nnunet-emcad benchmark NAME`` runs them too. What
they share lives in ``benchmarks.harness``, so each runs the same either way."""
