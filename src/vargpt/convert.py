"""Convert checkpoints between the released layouts and ours (nothing is downloaded; all paths are local).

    # a released VARGPT_LLaVA-v1 folder -> our folder (checked strictly, tensors copied bit for bit)
    python -m vargpt.convert --from released --in /models/VARGPT_LLaVA-v1 --out /models/vargpt-ours
    # stage-1 init as the release's prepare step: LLaVA-1.5 + VAR-d30 + its VQ-VAE -> a folder to train from
    python -m vargpt.convert --from llava-var --llava /models/llava-1.5-7b-hf --var /models/var_d30.pth \
        --vqvae /models/vae_ch160v4096z32.pth --config conf/model/vargpt_llava_7b.yaml --out /models/vargpt-stage1
    # ours (an exported folder, or a Lightning .ckpt with --config and --tokenizer) -> the released layout (bf16)
    python -m vargpt.convert --to released --in logs/runs/x/export --out /models/vargpt-release [--dtype fp32]
    # the VAR decoder / the VQ-VAE alone, as VAR's .pth state dicts
    python -m vargpt.convert --to var --in /models/vargpt-ours --out var.pth
    python -m vargpt.convert --to vqvae --in /models/vargpt-ours --out vae.pth
    # only check a checkpoint against the model its folder describes, print the report
    python -m vargpt.convert --check --in /models/VARGPT_LLaVA-v1

Every command prints the load report (loaded / missing / unexpected / reshaped / initialised, with parameter
counts) and fails, naming the keys, when the checkpoint does not fit (``--no-strict`` converts what fits).
Checkpoints are read with safetensors or ``torch.load(weights_only=True)`` only. This module is the command
line; the conversions are :mod:`vargpt.checkpoint.folder_conversion`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from vargpt.checkpoint.folder_conversion import check_source, convert_to_part, convert_to_released, resolve_model
from vargpt.checkpoint.io import DEFAULT_MAX_SHARD_BYTES, UnsafeCheckpointError
from vargpt.checkpoint.llava_var_init import init_stage1
from vargpt.checkpoint.released import export_released
from vargpt.checkpoint.released_config import parse_dtype
from vargpt.checkpoint.report import CheckpointMismatchError
from vargpt.model.config import load_model_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vargpt.convert",
        description="Convert VARGPT / LLaVA / VAR checkpoints between the released layouts and ours.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--from", dest="src", choices=("released", "llava-var"), help="import a released layout")
    what.add_argument("--to", dest="dst", choices=("released", "var", "vqvae"), help="export to a released layout")
    what.add_argument("--check", action="store_true", help="only match --in against its model and print the report")
    p.add_argument("--in", dest="inp", type=Path, help="source folder or checkpoint file")
    p.add_argument("--out", type=Path, help="output folder (--to released, --from ...) or file (--to var/vqvae)")
    p.add_argument("--dtype", default=None, help="bf16 | fp32 | fp16 | keep (default: keep, or bf16 for --to released)")
    p.add_argument("--config", type=Path, help="model YAML (conf/model/*.yaml) when --in does not describe itself")
    p.add_argument("--tokenizer", type=Path, help="tokenizer folder when --in has none")
    p.add_argument("--llava", type=Path, help="--from llava-var: llava-hf/llava-1.5-7b-hf folder")
    p.add_argument("--var", type=Path, help="--from llava-var: VAR checkpoint (var_d30.pth)")
    p.add_argument("--vqvae", type=Path, help="--from llava-var: VQ-VAE checkpoint (vae_ch160v4096z32.pth)")
    p.add_argument("--seed", type=int, default=0, help="--from llava-var: seed of the initialised parts")
    p.add_argument("--max-shard-size", default=str(DEFAULT_MAX_SHARD_BYTES), help="safetensors shard size (5GB)")
    p.add_argument("--no-strict", dest="strict", action="store_false", help="convert what fits instead of failing")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        _run(args)
    except (CheckpointMismatchError, UnsafeCheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace) -> None:
    def need(*names: str) -> None:
        missing = [f"--{n}" for n in names if getattr(args, n if n != "in" else "inp") is None]
        if missing:
            raise ValueError(f"this conversion needs {' '.join(missing)}")

    if args.check:
        need("in")
        cfg, ids, _ = resolve_model(args.inp, args.config, args.tokenizer)
        _, report, _ = check_source(args.inp, cfg, ids, strict=False)
        print(report.format())
        if not report.ok and args.strict:
            raise CheckpointMismatchError(report)
        return
    if args.src == "llava-var":
        need("llava", "config", "out")
        _from_llava_var(args)
        return
    need("in", "out")
    if args.src == "released" or args.dst == "released":
        default = "bf16" if args.dst == "released" else "keep"
        convert_to_released(
            args.inp,
            args.out,
            parse_dtype(args.dtype or default),
            config=args.config,
            tokenizer=args.tokenizer,
            strict=args.strict,
            max_shard_size=args.max_shard_size,
        )
        print(f"wrote {args.out}")
        return
    convert_to_part(
        args.inp, args.out, args.dst, parse_dtype(args.dtype or "keep"), args.config, args.tokenizer, args.strict
    )
    print(f"wrote {args.out}")


def _from_llava_var(args: argparse.Namespace) -> None:
    cfg = load_model_config(args.config)
    torch.manual_seed(args.seed)
    model, tokenizer, report = init_stage1(cfg, args.llava, var=args.var, vqvae=args.vqvae, strict=args.strict)
    print(report.format())
    export_released(
        model, args.out, dtype=args.dtype or "fp32", tokenizer=tokenizer, max_shard_size=args.max_shard_size
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
