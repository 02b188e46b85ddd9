"""Benchmarks: `python -m bench.dispatch` (API job creation) and `python -m bench.concurrency`
(jobs per second of one worker process). Each starts its own private PostgreSQL and Redis."""
