"""``python -m bench.fast_paths`` runs its interleaved comparison and prints one row per variant (the generation
part's paths are checked equal in tests/test_generation.py)."""

from __future__ import annotations

import importlib

import pytest

# Debug-size ops are too small to split; extra threads only spin when the CPUs are shared.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_fast_paths_bench_prints_every_variant(capsys):
    fast_paths = importlib.import_module("bench.fast_paths")
    args = ["device=cpu", "parts=vq_decode", "configs=tiny", "batch_sizes=1", "warmup=0", "repeats=1"]
    fast_paths.main(args)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert [r[-5] for r in rows if r and r[0] == "vq_decode"] == ["plain", "fast"]


def test_fast_paths_bench_needs_the_plain_variant():
    fast_paths = importlib.import_module("bench.fast_paths")
    with pytest.raises(SystemExit, match="plain"):
        fast_paths.main(["variants=fast"])
