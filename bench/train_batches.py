"""The batches of ``bench.train_step``: synthetic rows following the collator's contract, or the shapes world's.

Synthetic batches (``data=synthetic``): understanding rows ``<s> words <image>*P words reply </s>`` of ``seq_len``
tokens (labels on the reply), generation rows ``<s> words <gen_start> <gen_pad>*L <gen_end> </s>``; the host
counts are taken before the batch moves to the device (:func:`to_device`), as ``VARGPTModule`` does.
``data=shapes``: :func:`shapes_loader` over ``VARGPTDataModule``.
"""

from __future__ import annotations

from typing import Any

import torch
import yaml

from bench.common import ROOT
from vargpt.model.vargpt import HOST_COUNTS, BatchCounts
from vargpt.tokens import SpecialTokenIds

IGNORE_INDEX = -100


def synthetic_ids(vocab_size: int) -> Any:
    """Special token ids at the top of the vocabulary (the class embedding is sized gen_start + 2)."""
    V = vocab_size
    return SpecialTokenIds(image=V - 6, pad=V - 5, gen_start=V - 4, gen_end=V - 3, gen_pad=V - 2, eos=2, bos=1)


def make_batch(model: Any, args: dict[str, Any], seed: int) -> dict[str, Any]:
    """A right-padded synthetic batch in the collator's contract (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    ids, P, L = model.ids, model.num_image_tokens, model.num_gen_tokens
    B = int(args["micro_batch_size"])
    n_gen = round(B * float(args["gen_frac"]))
    n_und = B - n_gen
    seq_len = int(args["seq_len"])
    if n_und and seq_len < P + 4:
        raise SystemExit(f"seq_len={seq_len} leaves no room for text around the {P} image tokens")
    lo = 10
    hi = min(ids.image, ids.pad, ids.gen_start) - 1

    def words(n: int) -> list[int]:
        return torch.randint(lo, hi, (n,), generator=g).tolist()

    rows: list[list[int]] = []
    labels: list[list[int]] = []
    for _ in range(n_und):
        n = seq_len
        if args["len_jitter"]:
            n = max(P + 4, round(seq_len * (1 - float(args["len_jitter"]) * torch.rand((), generator=g).item())))
        text = n - P - 1  # minus <s>
        reply_n = max(1, min(text - 2, round(text * float(args["reply_frac"]))))
        prompt = words(text - reply_n)
        reply = words(reply_n - 1) + [ids.eos]
        row = [ids.bos] + prompt[:1] + [ids.image] * P + prompt[1:] + reply
        rows.append(row)
        labels.append([IGNORE_INDEX] * (len(row) - len(reply)) + reply)
    for _ in range(n_gen):
        prompt = words(int(args["gen_prompt_len"]))
        row = [ids.bos] + prompt + [ids.gen_start] + [ids.gen_pad] * L + [ids.gen_end, ids.eos]
        rows.append(row)
        lab = [IGNORE_INDEX] * (1 + len(prompt)) + [ids.gen_start] + [IGNORE_INDEX] * L + [ids.gen_end, ids.eos]
        labels.append(lab)
    T = -(-max(len(r) for r in rows) // 8) * 8
    input_ids = torch.full((B, T), ids.pad, dtype=torch.long)
    label_t = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        label_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    S, R = model.cfg.vision.image_size, model.cfg.vqvae.image_size
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask, "labels": label_t}
    batch["pixel_values"] = torch.randn(n_und, 3, S, S, generator=g) if n_und else None
    if n_gen and args["codes"]:
        batch["gen_codes"] = torch.randint(0, model.cfg.vqvae.vocab_size, (n_gen, L), generator=g)
        batch["pixel_gen_values"] = None
    else:
        batch["pixel_gen_values"] = (torch.rand(n_gen, 3, R, R, generator=g) * 2 - 1) if n_gen else None
    return batch


def to_device(batch: dict[str, Any], device: torch.device, ids: Any) -> dict[str, Any]:
    """The host batch on ``device`` with its counts taken on the host, as ``VARGPTModule`` hands it over (so the
    model's forward reads nothing back from the device)."""
    moved = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {**moved, HOST_COUNTS: BatchCounts.of(batch, ids)}


def shapes_loader(args: dict[str, Any], model_cfg: Any) -> tuple[Any, Any]:
    """(tokenizer, an endless iterator of host batches) from VARGPTDataModule over a shapes world."""
    from vargpt.data.datamodule import VARGPTDataModule  # needs omegaconf and webdataset: not on the GPU image

    data = yaml.safe_load((ROOT / "conf" / "data" / "shapes.yaml").read_text())
    mix = ROOT / "conf" / "stage" / "mix" / f"{args['stage']}_shapes.yaml"
    if mix.is_file():
        for split, sources in (yaml.safe_load(mix.read_text()) or {}).items():
            for name, over in sources.items():
                data[split][name].update(over)
    n = int(args["shapes_train"])
    data.update(root=str(args["data_root"]), micro_batch_size=int(args["micro_batch_size"]))
    # The argument parser reads "none" as None.
    group_by = args["group_by"] or "none"
    data.update(num_workers=int(args["data_workers"]), samples_per_epoch=max(n, 1000), group_by=group_by)
    world = f"shapes_bench_{n}"  # its own world: the demo's (data/shapes, 20k samples) takes minutes to build
    data["shapes"].update(dir=world, train=n, val=max(20, n // 50))
    for src in data["train_sources"].values():
        src["path"] = world + src["path"].removeprefix("shapes")
    data["val_sources"] = {}
    dm = VARGPTDataModule.from_config(data, model_cfg)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()

    def endless() -> Any:
        while True:
            for batch in loader:
                batch.pop("_stream", None)
                batch.pop("meta", None)
                yield batch

    return dm.tokenizer, endless()
