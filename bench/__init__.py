"""tollway's benchmarks: one script per benchmark (``bench/<name>/run.py``), shared code in
``bench.lib``, results appended to ``bench/RESULTS.md``."""
