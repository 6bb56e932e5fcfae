"""``python -m vargpt.convert``: released -> ours -> released is bit-exact (tokenizer and processor files copied
verbatim), ``--to var`` / ``--to vqvae`` give VAR-style state dicts, a Lightning checkpoint exports with its model
config, ``--from llava-var`` writes a stage-1 folder, mismatches and unsafe files exit 1 naming the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_checkpoint_released import WORLD_TEXT
from test_checkpoint_stage1 import llava_like_tokenizer

from vargpt.checkpoint import (
    build_from_folder,
    export_released,
    load_weights,
    read_state_dict,
    var_kwargs_from_checkpoint,
)
from vargpt.convert import main
from vargpt.model import VAR, build_vargpt, load_model_config
from vargpt.model.vqvae import vqvae_from_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "conf" / "model" / "tiny.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model exported as a release would ship it (bf16, shards, tokenizer, processor files)."""
    from vargpt.data.tokenizer import train_world_tokenizer

    root = tmp_path_factory.mktemp("cli")
    tok_dir = root / "tokenizer"
    tokenizer = train_world_tokenizer(WORLD_TEXT, tok_dir, vocab_size=200)
    cfg = load_model_config(TINY)
    torch.manual_seed(0)
    model = build_vargpt(cfg, tokenizer)
    released = export_released(model, root / "VARGPT_LLaVA-v1", dtype="bf16", tokenizer=tokenizer, max_shard_size="4MB")
    return {"root": root, "model": model, "cfg": cfg, "released": released, "tok_dir": tok_dir}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def test_released_to_ours_to_released_is_bit_exact(setup, tmp_path, capsys):
    rel = setup["released"]
    assert main(["--from", "released", "--in", str(rel), "--out", str(tmp_path / "ours")]) == 0
    assert "verdict: OK" in capsys.readouterr().out
    ours = read_state_dict(tmp_path / "ours")
    assert same(ours, read_state_dict(rel))  # --from keeps the stored dtype: a byte copy
    assert (tmp_path / "ours" / "model_config.yaml").is_file()

    assert main(["--to", "released", "--in", str(tmp_path / "ours"), "--out", str(tmp_path / "back")]) == 0
    assert same(read_state_dict(tmp_path / "back"), read_state_dict(rel))
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (rel / name).read_bytes(), name
    config_back = (tmp_path / "back" / "config.json").read_text()
    assert config_back == (rel / "config.json").read_text()

    # fp32 out of a bf16 folder: exact upcast; and the model built from it equals the bf16-rounded original.
    assert main(["--to", "released", "--in", str(rel), "--out", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0
    model, report = build_from_folder(tmp_path / "fp32")
    assert report.ok and not report.casts
    expected = {k: v.to(torch.bfloat16).to(v.dtype) for k, v in setup["model"].state_dict().items()}
    assert same(model.state_dict(), expected)


def test_to_var_and_to_vqvae(setup, tmp_path):
    model, rel = setup["model"], setup["released"]
    assert main(["--to", "var", "--in", str(rel), "--out", str(tmp_path / "var.pth"), "--dtype", "fp32"]) == 0
    var = VAR(**var_kwargs_from_checkpoint(tmp_path / "var.pth"))
    assert load_weights(var, tmp_path / "var.pth").ok
    expected = {k: v.to(torch.bfloat16).to(v.dtype) for k, v in model.vargpt_gen.state_dict().items()}
    assert same(var.state_dict(), expected)
    raw = torch.load(tmp_path / "var.pth", weights_only=True)
    assert set(raw) == set(model.vargpt_gen.state_dict())

    assert main(["--to", "vqvae", "--in", str(rel), "--out", str(tmp_path / "vae.pth")]) == 0
    q = setup["cfg"].vqvae
    vq = vqvae_from_config(q)
    assert load_weights(vq, tmp_path / "vae.pth").ok
    assert vq.quantize.embedding.weight.dtype == torch.float32
    # A VAR .pth converts to itself.
    assert main(["--to", "var", "--in", str(tmp_path / "var.pth"), "--out", str(tmp_path / "var2.pth")]) == 0
    assert same(read_state_dict(tmp_path / "var2.pth"), raw)


def test_lightning_checkpoint_exports_with_its_config(setup, tmp_path):
    model = setup["model"]
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()}, "global_step": 7}, ckpt)
    out = tmp_path / "export"
    args = ["--to", "released", "--in", str(ckpt), "--out", str(out), "--dtype", "fp32"]
    assert main(args) == 1  # a bare file needs to be told which model it holds
    assert main([*args, "--config", str(TINY), "--tokenizer", str(setup["tok_dir"])]) == 0
    rebuilt, report = build_from_folder(out)
    assert report.ok and rebuilt.ids == model.ids
    assert same(rebuilt.state_dict(), model.state_dict())


def test_mismatch_and_unsafe_inputs_exit_1_naming_the_problem(setup, tmp_path, capsys):
    state = read_state_dict(setup["released"])
    del state["vargpt_gen.head.bias"]
    bad = tmp_path / "bad"
    export = export_released(setup["model"], bad, dtype="bf16")
    from safetensors.torch import save_file

    for f in export.glob("model*"):
        f.unlink()
    save_file(state, str(bad / "model.safetensors"))
    assert main(["--check", "--in", str(bad)]) == 1
    assert "vargpt_gen.head.bias" in capsys.readouterr().err
    assert main(["--to", "released", "--in", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert main(["--to", "released", "--in", str(bad), "--out", str(tmp_path / "o"), "--no-strict"]) == 0
    assert "vargpt_gen.head.bias" in capsys.readouterr().out
    assert main(["--check", "--in", str(setup["released"])]) == 0


def test_from_llava_var_writes_a_stage1_folder(setup, tmp_path):
    cfg = setup["cfg"]
    llava = tmp_path / "llava"
    llava.mkdir()
    base_tok = llava_like_tokenizer(llava)
    torch.manual_seed(5)
    donor = build_vargpt(cfg, setup["model"].ids)
    llava_keys = ("vision_tower.", "multi_modal_projector.", "language_model.")
    from safetensors.torch import save_file

    save_file(
        {k: v for k, v in donor.state_dict().items() if k.startswith(llava_keys)}, str(llava / "model.safetensors")
    )
    (llava / "config.json").write_text('{"model_type": "llava"}')
    torch.save({k.removeprefix("vargpt_gen."): v for k, v in donor.vargpt_gen.state_dict().items()}, tmp_path / "v.pth")
    torch.save(donor.vae_local.state_dict(), tmp_path / "q.pth")
    out = tmp_path / "stage1"
    argv = ["--from", "llava-var", "--llava", str(llava), "--var", str(tmp_path / "v.pth")]
    argv += ["--vqvae", str(tmp_path / "q.pth"), "--config", str(TINY), "--out", str(out)]
    assert main(argv) == 0
    model, report = build_from_folder(out)
    assert report.ok and model.ids.gen_start == len(base_tok)
    sd, donor_sd = model.state_dict(), donor.state_dict()
    for k in donor_sd:
        if k.startswith(llava_keys + ("vae_local.",)):
            assert torch.equal(sd[k], donor_sd[k]), k


def test_module_entry_point(setup):
    proc = subprocess.run(
        [sys.executable, "-m", "vargpt.convert", "--check", "--in", str(setup["released"])],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "verdict: OK" in proc.stdout and "loaded" in proc.stdout
