"""VQ-VAE encode / decode throughput (images/s) per batch size, for the tiny config and the released size. Not a test.

    python -m bench.vqvae                                  # tiny (64 px) and ch160 (256 px), CPU or GPU
    python -m bench.vqvae config=ch160 batch_sizes=1,8,32,64 precision=bf16-mixed channels_last=true
    python -m bench.vqvae --help

``config=``: ``tiny`` (conf/model/tiny.yaml's vqvae: ch 32, 64 px, 130 tokens), ``ch160`` (the released
``vae_ch160v4096z32``: 108.9 M parameters, 256 px, 680 tokens), any ``conf/model`` name or yaml path (its
vqvae section), or a comma list. Default batch sizes 1,8,32; on a CPU the ch160 rows default to batch 1 only
(one 256-px image is ~0.2 TFLOP there and back; pass ``batch_sizes=`` to force).

encode = ``img_to_codes`` (encoder, quant_conv, the 10-scale residual quantiser): what a training step runs on
every generation target unless the data serves precomputed codes. It always runs in fp32 (the model forces
it: codes must not depend on the compute dtype). decode = ``codes_to_img`` (codes -> f_hat -> post_quant_conv
-> decoder), which generation runs once per image, through ``decode=``'s paths: ``fast`` (the defaults of
``vargpt.model.vqvae.DecodeOptions``: channels-last, upsample convs by output phase) or ``plain`` (every fast path
off; ``python -m bench.fast_paths`` times the two in turns); ``precision=bf16-mixed`` autocasts it. Figures are medians
of ``repeats`` timed calls after ``warmup``; GFLOP/img is torch's FlopCounterMode count (convolutions and
matmuls) of one image, TFLOP/s = GFLOP/img x img/s. ``json=PATH`` appends one JSON line per row.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from bench.common import (
    device_name,
    environment,
    load_model_cfg,
    median,
    parse_args,
    peak_memory_gib,
    pick_device,
    print_table,
    reset_peak_memory,
    timed,
    write_json,
)
from vargpt.model import build_vqvae
from vargpt.model.vqvae import DecodeOptions, vqvae_from_config
from vargpt.training.flops import measure_flops

DEFAULTS: dict[str, Any] = {
    "config": ["tiny", "ch160"],
    "batch_sizes": [],  # empty: 1,8,32 (ch160 on a CPU: 1)
    "precision": "32",
    "channels_last": False,
    "decode": "fast",  # fast | plain: DecodeOptions() or DecodeOptions.plain()
    "device": "auto",
    "warmup": 1,
    "repeats": 3,
    "json": None,
}


def build(name: str, device: torch.device) -> tuple[Any, str]:
    """A random VQ-VAE of the named size, eval mode, on ``device``."""
    if name == "ch160":
        torch.manual_seed(0)
        with torch.device(device):
            return build_vqvae().eval(), "vae_ch160v4096z32 (released shapes)"
    v = load_model_cfg(name).vqvae
    torch.manual_seed(0)
    with torch.device(device):
        vq = vqvae_from_config(v)
    return vq.eval(), f"{name} (ch {v.ch}, {v.image_size} px)"


def bench_config(
    name: str, args: dict[str, Any], device: torch.device, amp: bool, results: list[dict[str, Any]]
) -> list[list[str]]:
    """Table rows of one VQ-VAE size over the batch sizes (figures appended to ``results``)."""
    rows = []
    vq, what = build(name, device)
    if args["channels_last"]:
        vq = vq.to(memory_format=torch.channels_last)
    options = DecodeOptions() if args["decode"] == "fast" else DecodeOptions.plain()
    n_params = sum(p.numel() for p in vq.parameters())
    side, L = vq.image_size, vq.schedule.num_tokens
    default_sizes = [1] if device.type == "cpu" and name == "ch160" else [1, 8, 32]
    sizes = [int(b) for b in args["batch_sizes"]] or default_sizes
    one = torch.rand(1, 3, side, side, device=device) * 2 - 1
    enc_flops = measure_flops(vq.img_to_codes, one)
    one_codes = vq.img_to_codes(one)
    with torch.no_grad():
        dec_flops = measure_flops(vq.codes_to_img, one_codes, DecodeOptions.plain())

    def encode(img: torch.Tensor, state: dict[str, Any]) -> None:
        state["codes"] = vq.img_to_codes(img)

    def decode(state: dict[str, Any]) -> None:
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            vq.codes_to_img(state["codes"], options)

    for B in sizes:
        img = torch.rand(B, 3, side, side, device=device) * 2 - 1
        if args["channels_last"]:
            img = img.contiguous(memory_format=torch.channels_last)
        state: dict[str, Any] = {}
        reset_peak_memory(device)
        warmup, repeats = int(args["warmup"]), int(args["repeats"])
        t_enc = median(timed(lambda img=img, state=state: encode(img, state), device, warmup, repeats))
        t_dec = median(timed(lambda state=state: decode(state), device, warmup, repeats))
        peak = peak_memory_gib(device)
        res = {
            "config": name,
            "batch": B,
            "encode_ms": 1e3 * t_enc,
            "encode_img_s": B / t_enc,
            "decode_ms": 1e3 * t_dec,
            "decode_img_s": B / t_dec,
            "encode_gflop_img": enc_flops / 1e9,
            "decode_gflop_img": dec_flops / 1e9,
            "encode_tflops": enc_flops * B / t_enc / 1e12,
            "decode_tflops": dec_flops * B / t_dec / 1e12,
            "peak_gib": peak,
        }
        results.append(res)
        write_json(
            args["json"],
            dict(
                res,
                bench="vqvae",
                device=device_name(device),
                precision=args["precision"],
                channels_last=args["channels_last"],
                decode=args["decode"],
                params=n_params,
                env=environment(),
            ),
        )
        rows.append(
            [
                what,
                str(B),
                f"{res['encode_ms']:.1f}",
                f"{res['encode_img_s']:.2f}",
                f"{res['encode_gflop_img']:.2f}",
                f"{res['encode_tflops']:.3f}",
                f"{res['decode_ms']:.1f}",
                f"{res['decode_img_s']:.2f}",
                f"{res['decode_gflop_img']:.2f}",
                f"{res['decode_tflops']:.3f}",
                f"{peak:.3f}",
            ]
        )
    print(f"{what}: {n_params / 1e6:.1f} M parameters, {side} px, {L} tokens per image")
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args, _ = parse_args(argv, DEFAULTS, __doc__, prefixes=())
    device = pick_device(args["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    configs = args["config"] if isinstance(args["config"], list) else [args["config"]]
    amp = args["precision"] == "bf16-mixed"
    if args["precision"] not in ("32", "bf16-mixed"):
        raise SystemExit(f"precision={args['precision']!r}: 32 | bf16-mixed")
    if args["decode"] not in ("fast", "plain"):
        raise SystemExit(f"decode={args['decode']!r}: fast | plain")
    print(f"device: {device_name(device)}; {environment()}")
    rows, results = [], []
    for name in configs:
        rows += bench_config(str(name), args, device, amp, results)
    print_table(
        f"VQ-VAE encode (img_to_codes, fp32) / decode (codes_to_img, {args['precision']}) on {device_name(device)}, "
        f"channels_last={args['channels_last']}, decode={args['decode']}, "
        f"medians of {args['repeats']} after {args['warmup']} warm-up",
        [
            "config",
            "batch",
            "enc ms",
            "enc img/s",
            "enc GFLOP/img",
            "enc TFLOP/s",
            "dec ms",
            "dec img/s",
            "dec GFLOP/img",
            "dec TFLOP/s",
            "peak GiB",
        ],
        rows,
    )
    if device.type == "cpu":
        print("peak GiB on a CPU: the process's peak RSS (includes the Python/torch baseline)")
    return results


if __name__ == "__main__":
    main()
