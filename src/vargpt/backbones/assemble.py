"""Put the stage-0 products together: the starting VARGPT of the LLaVA stages, and the committed backbones.

    python -m vargpt.backbones.assemble parts --log-dir logs/backbones --out logs/backbones/parts
    python -m vargpt.backbones.assemble final --log-dir logs/backbones --out backbones/shapes

``parts`` loads the CLIP vision tower and the language model of a run root into one tiny VARGPT and exports
it in the released layout: the starting point of ``stage=world_llava_align`` (LLaVA-1.5's recipe, which needs
no generation part). ``final`` adds the generation parts to the exported model of ``world_llava_sft``: the
VQ-VAE and the class-conditional VAR (class embedding re-initialised), as the release's prepare step puts
LLaVA-1.5, VAR-d30 and the VQ-VAE together; it writes that VARGPT (bf16, as released) and the CLIP-score judge
into the backbones folder with a manifest: sha256 of every file, the commands, and the metrics each stage
reached. So the two chains (generation: VQ-VAE -> VAR; understanding: vision, LM, judge -> LLaVA) never wait
for each other (``make backbones`` runs them side by side).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vargpt.backbones.build import assemble_vargpt
from vargpt.checkpoint import build_from_folder, export_released
from vargpt.data.tokenizer import load_tokenizer
from vargpt.model import build_vargpt, load_model_config
from vargpt.training.checkpointing import read_stage_record

REPO = Path(__file__).resolve().parents[3]
# VARGPT sub-module <- the recipe stage that trains it, per chain.
UNDERSTANDING_PARTS = {"vision_tower": "world_vision", "language_model": "world_lm"}
GENERATION_PARTS = {"vae_local": "world_vqvae", "vargpt_gen": "world_var"}
RECIPE_STAGES = ("world_vqvae", "world_var", "world_vision", "world_lm", "world_clip")
ALL_STAGES = (*RECIPE_STAGES, "world_llava_align", "world_llava_sft")
MANIFEST = "manifest.json"


def _load_parts(model: torch.nn.Module, log_dir: Path, parts: dict[str, str]) -> None:
    for name, path in assemble_vargpt(model, log_dir, parts).items():
        print(f"{name:16s} <- {path}")


def assemble_parts(log_dir: Path, out: Path, model_yaml: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Export a tiny VARGPT with the understanding chain's products (the rest fresh) for the LLaVA stages."""
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_vargpt(load_model_config(model_yaml), tokenizer)
    _load_parts(model, log_dir, UNDERSTANDING_PARTS)
    return export_released(model, out, dtype="fp32", tokenizer=tokenizer)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stage_metrics(log_dir: Path, stage: str) -> dict[str, float]:
    """The final metrics a stage's run wrote in its ``summary.txt`` (``key: value`` or ``key=value``)."""
    record = read_stage_record(log_dir, stage)
    summary = Path(record.checkpoint).parents[1] / "summary.txt"
    if not summary.is_file():
        return {}
    pairs = re.findall(r"([A-Za-z_][\w/-]*)\s*[:=]\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\b", summary.read_text())
    return {key: float(value) for key, value in pairs}


def write_final(log_dir: Path, out: Path, commands: list[str]) -> Path:
    """The backbones folder: the LLaVA-tuned VARGPT with the generation parts, the judge, a manifest (all bf16)."""
    model, _ = build_from_folder(read_stage_record(log_dir, "world_llava_sft").export_dir)
    _load_parts(model, log_dir, GENERATION_PARTS)
    if out.exists():
        shutil.rmtree(out)
    export_released(model, out, dtype="bf16")
    judge = read_stage_record(log_dir, "world_clip")
    judge_dir = Path(judge.export_dir)
    # The judge only scores images: bf16 halves its share of the size budget at no cost to the metric.
    state = {k: v.to(torch.bfloat16) for k, v in load_file(str(judge_dir / "judge_clip.safetensors")).items()}
    save_file(state, str(out / "judge_clip.safetensors"))
    shutil.copy(judge_dir / "judge_clip.json", out / "judge_clip.json")
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": "vargpt-shapes-backbones-v1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commands": commands,
        "metrics": {stage: _stage_metrics(log_dir, stage) for stage in ALL_STAGES},
        "files": {str(p.relative_to(out)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files},
        "total_bytes": sum(p.stat().st_size for p in files),
    }
    path = out / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def verify_backbones(folder: Path) -> list[str]:
    """Files whose sha256 or size differs from the manifest, or that are missing (empty = all good)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    bad = []
    for name, entry in manifest["files"].items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != entry["bytes"] or _sha256(p) != entry["sha256"]:
            bad.append(name)
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("parts", "final", "verify"))
    ap.add_argument("--log-dir", type=Path, default=Path("logs/backbones"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", type=Path, default=REPO / "conf" / "model" / "tiny.yaml")
    ap.add_argument("--tokenizer", type=Path, default=Path("data/shapes/tokenizer"))
    ap.add_argument("--command", action="append", default=[], help="a command of the recipe (for the manifest)")
    args = ap.parse_args(argv)
    if args.what == "parts":
        print(assemble_parts(args.log_dir, args.out, args.model, args.tokenizer))
    elif args.what == "final":
        print(write_final(args.log_dir, args.out, args.command))
    else:
        bad = verify_backbones(args.out)
        print("ok" if not bad else f"mismatch: {bad}")
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
