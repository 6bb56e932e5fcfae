"""Throughput, latency and memory benchmarks: scripts run from the repository root as ``python -m bench.<name>``.

They print figures (docs/performance.md), they are not tests. ``vargpt`` must be importable: installed
(``make install``), or ``PYTHONPATH=src`` in a bare checkout (``bench/gpu_check.sh`` sets it).
"""
