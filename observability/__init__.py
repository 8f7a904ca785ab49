"""What a run tells its user: log lines, metrics.jsonl rows and the progress bar (metrics),
per-rank traces of where time goes (profiling), and plots of the metrics (plot)."""
