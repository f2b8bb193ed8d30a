"""asv benchmarks of spr's core (``asv run --quick --python=same``) and the ratio report
(``python -m benchmarks.ratios``)."""
