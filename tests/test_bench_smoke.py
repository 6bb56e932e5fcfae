"""The bench scripts run end to end on the tiny config (2 CPU steps) and print their tables; the FLOP count
of bench/flops.py agrees with torch's own counter where both count the same thing; the PyYAML config
fallback (the GPU image has no omegaconf) reads the same config as OmegaConf."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def bench():
    """Import a bench script by name (the scripts import their helpers as top-level modules)."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCH))


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


def test_var_flops_match_torch_counter(bench):
    """Weight FLOPs of the VAR step equal FlopCounterMode's count: forward exactly; backward up to the input
    gradient of the first layer (autograd skips it: the teacher input needs none). Attention is left out of
    this comparison (on a CPU the counter does not see the fused SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = bench("flops")
    from vargpt.model import build_var

    torch.manual_seed(0)
    var = build_var(2, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3), embed_dim=32, num_heads=2).train()
    var.cond_drop_rate = 0.0
    B = 3
    count = flops.VARFlops(var)
    attn = 4.0 * count.layers * count.dim * count.pairs * B
    fwd_weights = count(B, backward=False).forward - attn
    teacher = torch.randn(B, var.L - var.first_l, var.Cvae)
    with FlopCounterMode(display=False) as fc:
        logits = var(torch.zeros(B, dtype=torch.long), teacher)
    assert fc.get_total_flops() == fwd_weights
    with FlopCounterMode(display=False) as fc:
        logits.sum().backward()
    bwd_weights = count(B).backward - 2 * attn
    first_layer_input_grad = 2.0 * var.word_embed.weight.numel() * B * (var.L - var.first_l)
    assert fc.get_total_flops() == bwd_weights - first_layer_input_grad
    assert flops.block_causal_pairs((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)) == 286_434


def test_vargpt_flops_follow_the_stage(bench):
    """Frozen parts on the gradient path cost 4N, trained ones 6N, frozen ones off it 2N."""
    flops = bench("flops")
    common = bench("common")
    from vargpt.model import build_vargpt
    from vargpt.training.stage import apply_stage

    cfg = common.load_model_cfg("tiny")
    ids = bench("train_step").synthetic_ids(cfg.llm.vocab_size)
    model = build_vargpt(cfg, ids)
    shape = flops.BatchShape(lengths=[100, 60], padded_len=104, num_labels=20, num_und_images=1, num_gen_images=1)
    stages = {}
    for name in ("pretrain", "sft_mixed", "sft_gen"):
        apply_stage(model, common.load_stage(name)["trainable"], name)
        stages[name] = flops.VARGPTFlops(model)(shape).parts
    lm_fwd, lm_bwd = stages["sft_mixed"]["language_model"]
    attn = 4.0 * 4 * 128 * (100 * 101 // 2 + 60 * 61 // 2)
    assert lm_bwd - 2 * attn == pytest.approx(2 * (lm_fwd - attn))  # trained: 6N
    lm_fwd3, lm_bwd3 = stages["sft_gen"]["language_model"]
    assert lm_fwd3 == lm_fwd and lm_bwd3 - 2 * attn == pytest.approx(lm_fwd - attn)  # frozen, grad flows: 4N
    vis_fwd, vis_bwd = stages["sft_gen"]["vision_tower"]
    assert vis_fwd > 0 and vis_bwd == 0  # frozen, nothing upstream trains: 2N


def test_yaml_fallback_reads_the_same_config(bench, monkeypatch):
    common = bench("common")
    from vargpt.model import load_model_config

    for name, overrides in (("tiny", ["var.depth=2"]), ("vargpt_llava_7b", ["llm.num_hidden_layers=4", "vqvae.ch=32"])):
        path = common.model_yaml(name)
        assert common._load_model_cfg_yaml(path, overrides) == load_model_config(path, overrides)
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
