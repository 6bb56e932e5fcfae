"""The bench scripts run end to end on the tiny config (2 CPU steps) and print their tables; the PyYAML config
fallback (the GPU image has no omegaconf) reads the same config as OmegaConf; ``python -m bench.<name>`` runs from
the repository root with nothing added to ``sys.path``. (The FLOP count they print is vargpt.training.flops,
tested in test_training_flops.py.)"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """Import a bench script by name, as the module ``python -m bench.<name>`` runs."""
    return lambda name: importlib.import_module(f"bench.{name}")


def parse_table(out: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the printed table whose header line starts with ``first_header``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first_header + "  "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows = []
    for line in lines[start + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(header):
            break
        rows.append(cells)
    return header, rows


def test_train_step_tiny_prints_the_table(bench, capsys):
    train_step = bench("train_step")
    argv = ["device=cpu", "steps=2", "warmup=0", "micro_batch_size=2", "gen_frac=0.5", "seq_len=80", "codes=true"]
    results = train_step.main(argv)
    out = capsys.readouterr().out
    header, rows = parse_table(out, "stage")
    for col in ("step ms", "data wait ms", "samples/s", "tokens/s", "TFLOP/s", "MFU %", "peak GiB"):
        assert col in header, (col, header)
    assert len(rows) == 1
    row = dict(zip(header, rows[0], strict=True))
    for col in ("step ms", "fwd ms", "bwd ms", "samples/s", "tokens/s", "MFU %", "peak GiB"):
        assert float(row[col]) > 0, (col, row)
    assert float(row["data wait ms"]) == 0.0
    # The FLOP table: the stage trains the VAR decoder, so its backward is counted.
    _, flop_rows = parse_table(out, "part")
    assert any(r[0] == "var_blocks" for r in flop_rows)
    assert results[0]["gflop_per_step"] > 0


def test_vqvae_tiny_prints_the_table(bench, capsys):
    vqvae = bench("vqvae")
    vqvae.main(["device=cpu", "config=tiny", "batch_sizes=1,2", "warmup=0", "repeats=1"])
    out = capsys.readouterr().out
    header, rows = parse_table(out, "config")
    for col in ("batch", "enc img/s", "dec img/s", "enc GFLOP/img", "peak GiB"):
        assert col in header
    assert [r[1] for r in rows] == ["1", "2"]
    for r in rows:
        row = dict(zip(header, r, strict=True))
        assert float(row["enc img/s"]) > 0 and float(row["dec img/s"]) > 0 and float(row["enc GFLOP/img"]) > 0


def test_yaml_fallback_reads_the_same_config(bench, monkeypatch):
    common = bench("common")
    from vargpt.model import load_model_config

    for name, overrides in (("tiny", ["var.depth=2"]), ("vargpt_llava_7b", ["llm.num_hidden_layers=4", "vqvae.ch=32"])):
        path = common.model_yaml(name)
        assert common._load_model_cfg_yaml(path, overrides) == load_model_config(path, overrides)
    with pytest.raises(ValueError, match=r"model.image_loss_reduction: 'tokens' is not one of \['token', 'scale'\]"):
        common._load_model_cfg_yaml(common.model_yaml("tiny"), ["image_loss_reduction=tokens"])
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # as on the GPU image
    assert common.load_model_cfg("tiny", ["llm.num_hidden_layers=3"]).llm.num_hidden_layers == 3


def test_arguments_are_checked(bench):
    common = bench("common")
    args, extra = common.parse_args(
        ["micro_batch_size=1,8", "model.llm.num_hidden_layers=4", "compile=true"],
        {"micro_batch_size": 8, "compile": False},
        "doc",
    )
    assert args == {"micro_batch_size": [1, 8], "compile": True}
    assert extra == {"model.": ["llm.num_hidden_layers=4"]}
    with pytest.raises(SystemExit, match="unknown argument"):
        common.parse_args(["micro_batchsize=2"], {"micro_batch_size": 8}, "doc")


def test_a_bench_script_runs_as_a_module_of_the_bench_package(tmp_path):
    """``python -m bench.summarize`` from the repository root: the package resolves its own imports."""
    results = tmp_path / "results.jsonl"
    row = {"bench": "vqvae", "config": "tiny", "batch": 2, "device": "cpu", "precision": "32",
           "encode_img_s": 10.0, "decode_img_s": 20.0}  # fmt: skip
    results.write_text(json.dumps(row) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "bench.summarize", str(results)], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "  tiny batch 2 (cpu, decode 32): encode 10.0 img/s, decode 20.0 img/s" in done.stdout.splitlines()
