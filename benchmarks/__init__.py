"""Side-by-side measurements (``dia2_trt.benchmarks``): the ``dia2-rt bench`` harness, its report,
and the suite scripts (suite.py, export_2b.py, checkpoints.py, run as files).

Only ``dia2-rt bench`` loads this package; ``dia2-rt speak`` never does.
"""
