"""tollway's benchmarks: one script per benchmark (``bench/<name>/run.py``), shared code in
``bench.lib``, each one's latest results in its section of ``bench/RESULTS.md``."""
