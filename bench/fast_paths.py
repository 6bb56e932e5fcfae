"""The fast paths of decoding against the plain paths, interleaved call by call in one process. Not a test.

    python -m bench.fast_paths                                         # VQ-VAE decode (tiny, ch160) + generation
    python -m bench.fast_paths parts=generate batch_sizes=1,8 repeats=9 threads=1
    python -m bench.fast_paths parts=vq_decode configs=ch160 batch_sizes=1 variants=plain,fast,fast_bf16
    python -m bench.fast_paths --help

On a shared machine a figure alone means little; a ratio of two paths timed in turns (A, B, A, B, ...) means
more, since the load hits both alike. Every row is one variant; ``x plain`` is the plain path's median over the
variant's (min: ratio of the fastest calls).

``vq_decode``: ``VQVAE.codes_to_img`` of a random VQ-VAE of ``configs`` (``tiny``: conf/model/tiny.yaml's,
64 px; ``ch160``: the released geometry, 256 px; on a CPU only batch 1 of it runs unless ``batch_sizes`` is
given), in fp32 weights. ``generate``: ``vargpt.inference.generate`` of the tiny VARGPT (random weights, as
bench/generate.py builds it), one forced image per sample, release guidance, top-k 900 / top-p 0.96.

variants: ``plain`` (every fast path off: ``FastPaths.plain()``, ``DecodeOptions.plain()``), ``fast`` (the
defaults), ``fast_bf16`` (the defaults + bf16 autocast of the VQ-VAE decoder), ``fast_compile`` (the defaults +
``torch.compile`` of the VQ-VAE decoder; its first call compiles, outside the timing).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from bench.common import (
    device_name,
    environment,
    load_model_cfg,
    median,
    parse_args,
    pick_device,
    print_table,
    sync,
    write_json,
)
from bench.generate import build_vargpt_model
from vargpt.inference import generate
from vargpt.inference.fast_paths import FastPaths
from vargpt.model import build_vqvae
from vargpt.model.vqvae import DecodeOptions, vqvae_from_config

DEFAULTS: dict[str, Any] = {
    "parts": ["vq_decode", "generate"],
    "configs": ["tiny", "ch160"],  # vq_decode only
    "batch_sizes": [],  # empty: 1,8 (ch160 on a CPU: 1)
    "variants": ["plain", "fast"],
    "device": "auto",
    "warmup": 1,
    "repeats": 7,
    "threads": 0,  # torch CPU threads (0: torch's default)
    "seed": 0,
    "json": None,
}
DECODE_VARIANTS: dict[str, DecodeOptions] = {
    "plain": DecodeOptions.plain(),
    "fast": DecodeOptions(),
    "fast_bf16": DecodeOptions(bf16=True),
    "fast_compile": DecodeOptions(compile=True),
}


def interleaved(calls: dict[str, Callable[[], object]], device: torch.device, warmup: int, repeats: int):
    """Seconds of every call, the variants taking turns: {name: [s, ...]}."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def rows_of(part: str, what: str, B: int, times: dict[str, list[float]], args: dict[str, Any]) -> list[list[str]]:
    """Table rows (and JSON lines) of one interleaved comparison."""
    rows = []
    base_med, base_min = median(times["plain"]), min(times["plain"])
    for name, ts in times.items():
        rec = {"part": part, "what": what, "batch": B, "variant": name, "median_ms": 1e3 * median(ts)}
        rec |= {"min_ms": 1e3 * min(ts), "x_plain_median": base_med / median(ts), "x_plain_min": base_min / min(ts)}
        write_json(args["json"], {"bench": "fast_paths", **rec, "env": environment()})
        rows.append([part, what, str(B), name, f"{rec['median_ms']:.1f}", f"{rec['min_ms']:.1f}"])
        rows[-1] += [f"{rec['x_plain_median']:.2f}", f"{rec['x_plain_min']:.2f}"]
    return rows


def bench_vq_decode(name: str, args: dict[str, Any], device: torch.device) -> list[list[str]]:
    torch.manual_seed(args["seed"])
    with torch.device(device):
        vq = build_vqvae() if name == "ch160" else vqvae_from_config(load_model_cfg(name).vqvae)
    vq.eval().requires_grad_(False)
    side = vq.image_size
    sizes = [int(b) for b in args["batch_sizes"]] or ([1] if device.type == "cpu" and name == "ch160" else [1, 8])
    rows = []
    for B in sizes:
        codes = vq.img_to_codes(torch.rand(B, 3, side, side, device=device) * 2 - 1)

        def call(options: DecodeOptions, codes=codes) -> None:
            with torch.no_grad():
                vq.codes_to_img(codes, options)

        calls = {v: (lambda o=DECODE_VARIANTS[v]: call(o)) for v in args["variants"]}
        times = interleaved(calls, device, int(args["warmup"]), int(args["repeats"]))
        rows += rows_of("vq_decode", f"{name} ({side} px)", B, times, args)
    return rows


def bench_generate(args: dict[str, Any], device: torch.device) -> list[list[str]]:
    model = build_vargpt_model("tiny", device, torch.float32, args["seed"])
    sampling = {"max_new_tokens": 1, "uncond": "release", "cfg": 1.5, "top_k": 900, "top_p": 0.96}
    variants = {
        v: FastPaths.plain() if v == "plain" else dataclasses.replace(FastPaths(), vq_decode=DECODE_VARIANTS[v])
        for v in args["variants"]
    }
    rows = []
    for B in [int(b) for b in args["batch_sizes"]] or [1, 8]:
        prompts = ["Draw a red circle on a white background."] * B

        def call(fast: FastPaths, prompts=prompts) -> None:
            generate(model, prompts, sampling=sampling, force_image=True, return_pil=False, fast_paths=fast)

        calls = {v: (lambda f=variants[v]: call(f)) for v in args["variants"]}
        times = interleaved(calls, device, int(args["warmup"]), int(args["repeats"]))
        rows += rows_of("generate", "tiny VARGPT, 1 image/sample", B, times, args)
    return rows


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_args(argv, DEFAULTS, __doc__, prefixes=())
    unknown = (set(args["parts"]) - {"vq_decode", "generate"}) | (set(args["variants"]) - set(DECODE_VARIANTS))
    if unknown or "plain" not in args["variants"]:
        raise SystemExit(f"unknown parts/variants {sorted(unknown)}, or no 'plain' variant to compare with")
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    device = pick_device(args["device"])
    print(f"device: {device_name(device)}, {torch.get_num_threads()} threads; {environment()}")
    rows = []
    if "vq_decode" in args["parts"]:
        for name in args["configs"]:
            rows += bench_vq_decode(str(name), args, device)
    if "generate" in args["parts"]:
        rows += bench_generate(args, device)
    print_table(
        f"fast paths vs plain, interleaved, medians of {args['repeats']} after {args['warmup']} warm-up",
        ["part", "what", "batch", "variant", "median ms", "min ms", "x plain (med)", "x plain (min)"],
        rows,
    )


if __name__ == "__main__":
    main()
