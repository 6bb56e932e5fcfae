"""Training step of the class-conditional VAR decoder (``build_var``): tokens/s and MFU. Not a test.

    python -m bench.var_step                                        # GPU: d16 x 64 and d30 x 16; CPU: tiny x 8, d4 x 2
    python -m bench.var_step configs=d16:64,d30:16 precision=bf16-mixed compile=model
    python -m bench.var_step configs=d16:64 optimizer=true          # with AdamW, as a real step
    python -m bench.var_step --help

``configs``: comma list of ``<var>:<batch>`` with ``<var>`` = ``dN`` (VAR-dN at 256 px: width 64N, N heads,
the released 10 scales, L = 680 tokens, vocabulary 4096, 1000 classes, drop-path 0.1 N / 24) or ``tiny``
(conf/model/tiny.yaml's VAR and scales: L = 130).

The step is what the issue's reference measured with the official VAR code (SDPA attention, bf16 autocast,
forward + backward, no optimizer): ``logits = var(labels, teacher_input)`` (10 % of labels dropped to the
null class, train mode), mean cross-entropy over all L tokens, ``backward``, ``zero_grad(set_to_none)``.
Teacher input (the VQ-VAE's multi-scale features) and targets are random tensors made once, as a data
loader would hand them over; ``encode=true`` runs the frozen VQ-VAE (``img_to_codes`` + teacher input) in the
step, as VAR's trainer does. ``optimizer=true`` adds AdamW (``fused_adam=true``: the fused kernel).

Reported: medians over ``steps`` steps after ``warmup``: step / forward / backward / optimizer ms, tokens/s
(B x L / step), images/s, TFLOP/s, ``MFU %`` with this framework's exact count (vargpt.training.flops VARFlops:
6N per token for the per-token matmuls, AdaLN per image, block-causal attention 4 C pairs forward and 8 C pairs
backward per block) and ``MFU6N %`` = 6 x all parameters x B x L / time / peak, the convention of the
reference figures (which count AdaLN and head per token and no attention), so that the two MFU columns
compare with them like for like. ``ref tok/s`` and ``x ref`` show the official figure for the same size and
batch, measured on an H200 (compare only on that card); the issue's target is 1.3x.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import (
    PhaseTimer,
    device_name,
    environment,
    load_model_cfg,
    median,
    parse_args,
    peak_flops,
    peak_memory_gib,
    pick_device,
    print_table,
    reset_peak_memory,
    sync,
    write_json,
)
from vargpt.model import build_var, build_vqvae
from vargpt.model.vqvae import vqvae_from_config
from vargpt.training.flops import VARFlops

DEFAULTS: dict[str, Any] = {
    "configs": [],  # empty: d16:64,d30:16 on a GPU, tiny:8,d4:2 on a CPU
    "precision": "auto",  # 32 | bf16-mixed | auto (bf16-mixed on a GPU, 32 on a CPU)
    "compile": False,  # false | true (= model) | blocks | model
    "optimizer": False,
    "fused_adam": False,
    "encode": False,
    "device": "auto",
    "steps": 10,
    "warmup": 3,
    "peak_tflops": None,
    "seed": 0,
    "json": None,
}
# Official VAR code on an H200 (SDPA, bf16 autocast, forward + backward, no optimizer): tokens/s.
REFERENCE_TOKENS_S = {(16, 64): 145.6e3, (30, 16): 31.9e3}
TARGET_FACTOR = 1.3


def build(spec: str, device: torch.device, with_vqvae: bool = False) -> tuple[Any, Any, int]:
    """(VAR, VQ-VAE or None, depth) for ``dN`` or ``tiny``; the VQ-VAE only ``with_vqvae`` (``encode=true``)."""
    torch.manual_seed(0)
    with torch.device(device):
        if spec == "tiny":
            cfg = load_model_cfg("tiny")
            v, q = cfg.var, cfg.vqvae
            var = build_var(
                v.depth,
                vocab_size=q.vocab_size,
                z_channels=q.z_channels,
                patch_nums=tuple(q.patch_nums),
                embed_dim=v.embed_dim,
                num_heads=v.num_heads,
                drop_path_rate=v.drop_path_rate,
            )
            return var, (vqvae_from_config(q) if with_vqvae else None), v.depth
        if not spec.startswith("d") or not spec[1:].isdigit():
            raise SystemExit(f"VAR size {spec!r}: dN (e.g. d16) or tiny")
        depth = int(spec[1:])
        return build_var(depth), (build_vqvae() if with_vqvae else None), depth


def run_one(spec: str, B: int, args: dict[str, Any], device: torch.device, amp: bool, peak: float) -> dict[str, Any]:
    """Build VAR ``spec``, warm up, time ``steps`` steps at batch ``B``; return the row's figures."""
    var, vq, depth = build(spec, device, with_vqvae=bool(args["encode"]))
    var.train()
    if vq is not None:
        vq.eval().requires_grad_(False)
    counter = VARFlops(var)
    L, first_l, V = var.L, var.first_l, var.V
    g = torch.Generator(device=device).manual_seed(int(args["seed"]))
    labels = torch.randint(0, var.num_classes, (B,), device=device, generator=g)
    teacher = torch.randn(B, L - first_l, var.Cvae, device=device, generator=g)
    targets = torch.randint(0, V, (B, L), device=device, generator=g)
    images = None
    if vq is not None:
        images = torch.rand(B, 3, vq.image_size, vq.image_size, device=device, generator=g) * 2 - 1
    model = var
    mode = args["compile"]
    if mode in (True, "true", "model"):
        model = torch.compile(var)
    elif mode == "blocks":
        for block in var.blocks:
            block.compile()
    elif mode not in (False, "false", None):
        raise SystemExit(f"compile={mode!r}: false | true | model | blocks")
    opt = None
    if args["optimizer"]:
        kw = {"fused": True} if args["fused_adam"] else {}
        opt = torch.optim.AdamW(var.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, **kw)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()

    def step(timer: PhaseTimer | None = None) -> None:
        if timer:
            timer.mark("start")
        x, gt = teacher, targets
        if vq is not None:
            codes = vq.img_to_codes(images)
            x, gt = vq.codes_to_teacher_input(codes), torch.cat(codes, 1)
        with ctx:
            logits = model(labels, x)
        loss = F.cross_entropy(logits.view(-1, V), gt.view(-1))
        if timer:
            timer.mark("fwd")
        loss.backward()
        if timer:
            timer.mark("bwd")
        if opt is not None:
            opt.step()
        var.zero_grad(set_to_none=True)
        if timer:
            timer.mark("opt")

    for _ in range(int(args["warmup"])):
        step()
    sync(device)
    reset_peak_memory(device)
    times: dict[str, list[float]] = {"step": [], "fwd": [], "bwd": [], "opt": []}
    for _ in range(int(args["steps"])):
        timer = PhaseTimer(device)
        t0 = time.perf_counter()
        step(timer)
        sync(device)
        times["step"].append(time.perf_counter() - t0)
        for k, v in timer.seconds().items():
            times[k].append(v)
    t = median(times["step"])
    flops = counter(B).total
    tok_s = B * L / t
    ref = REFERENCE_TOKENS_S.get((depth, B)) if spec != "tiny" else None
    return {
        "var": spec,
        "depth": depth,
        "batch": B,
        "tokens_per_image": L,
        "params": counter.num_params,
        "step_ms": 1e3 * t,
        "min_step_ms": 1e3 * min(times["step"]),
        "fwd_ms": 1e3 * median(times["fwd"]),
        "bwd_ms": 1e3 * median(times["bwd"]),
        "opt_ms": 1e3 * median(times["opt"]),
        "tokens_per_s": tok_s,
        "images_per_s": B / t,
        "tflops": flops / t / 1e12,
        "mfu_pct": 100 * flops / t / peak,
        "mfu6n_pct": 100 * counter.reference_6n(B) / t / peak,
        "ref_tokens_per_s": ref,
        "x_ref": tok_s / ref if ref else None,
        "peak_gib": peak_memory_gib(device),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args, _ = parse_args(argv, DEFAULTS, __doc__, prefixes=())
    device = pick_device(args["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    configs = args["configs"] or (["d16:64", "d30:16"] if device.type == "cuda" else ["tiny:8", "d4:2"])
    configs = configs if isinstance(configs, list) else [configs]
    precision = str(args["precision"])
    if precision == "auto":
        precision = "bf16-mixed" if device.type == "cuda" else "32"
    if precision not in ("32", "bf16-mixed"):
        raise SystemExit(f"precision={precision!r}: 32 | bf16-mixed")
    amp = precision == "bf16-mixed"
    peak, peak_src = peak_flops(device, amp, args["peak_tflops"])
    print(f"device: {device_name(device)}; {environment()}; peak {peak / 1e12:.3f} TFLOP/s ({peak_src})")
    rows, results = [], []
    for item in configs:
        spec, _, b = str(item).partition(":")
        res = run_one(spec, int(b or 1), args, device, amp, peak)
        gc.collect()  # the previous configuration's model and optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(res)
        write_json(
            args["json"],
            dict(
                res,
                bench="var_step",
                device=device_name(device),
                precision=precision,
                compile=args["compile"],
                optimizer=args["optimizer"],
                fused_adam=args["fused_adam"],
                encode=args["encode"],
                peak_tflops=peak / 1e12,
                env=environment(),
            ),
        )
        ref = res["ref_tokens_per_s"]
        rows.append(
            [
                f"{spec} ({res['params'] / 1e6:.0f} M)",
                str(res["batch"]),
                f"{res['step_ms']:.1f}",
                f"{res['min_step_ms']:.1f}",
                f"{res['fwd_ms']:.1f}",
                f"{res['bwd_ms']:.1f}",
                f"{res['opt_ms']:.1f}",
                f"{res['tokens_per_s'] / 1e3:.2f}",
                f"{res['images_per_s']:.2f}",
                f"{res['tflops']:.3f}",
                f"{res['mfu_pct']:.1f}",
                f"{res['mfu6n_pct']:.1f}",
                f"{ref / 1e3:.1f}" if ref else "-",
                f"{res['x_ref']:.2f}" if ref else "-",
                f"{res['peak_gib']:.2f}",
            ]
        )
    print_table(
        f"VAR training step ({device_name(device)}, {precision}, compile={args['compile']}, "
        f"optimizer={args['optimizer']}, encode={args['encode']}; "
        f"medians of {args['steps']} after {args['warmup']} warm-up)",
        [
            "VAR",
            "batch",
            "step ms",
            "min ms",
            "fwd ms",
            "bwd ms",
            "opt ms",
            "k tok/s",
            "img/s",
            "TFLOP/s",
            "MFU %",
            "MFU6N %",
            "ref k tok/s",
            "x ref",
            "peak GiB",
        ],
        rows,
    )
    print(f"ref: official VAR code on an H200 (target: {TARGET_FACTOR}x on the same card)")
    return results


if __name__ == "__main__":
    main()
