"""Generation speed per batch size: VARGPT images (LLM and VAR parts timed apart), VARGPT text, and the
class-conditional VAR decoder (``build_var`` path, ``VAR.sample`` + VQ-VAE decode). Prints tables; not a test.

    python -m bench.generate                                          # tiny model, batch 1,8,32,64
    python -m bench.generate batch_sizes=1,8 repeats=2 threads=1      # quicker; 1 thread on a busy CPU
    python -m bench.generate model=vargpt_llava_7b precision=bf16-true batch_sizes=1,8   # real sizes (GPU)
    python -m bench.generate parts=var var=d16 precision=bf16-mixed    # VAR-d16 alone: the issue's GPU bar
    python -m bench.generate parts=var var=d8 batch_sizes=4 scale_step=plain,fast,bf16 threads=1   # fast paths
    python -m bench.generate --help

Weights are random (speed does not depend on them); the tokenizer is a throwaway BPE trained in a second.
Every figure is the median of ``repeats`` timed calls after ``warmup`` untimed ones. ``latency`` is the wall
time of one batched call (prompt to PIL-free images), ``img/s`` = batch / latency. The split (prefill / LLM
scales / VAR / VQ decode) comes from one extra call with a device sync around every part, so it is exact per
part but does not add up to the unsynchronised latency. ``precision``: 32 (fp32), bf16-mixed / fp16-mixed
(autocast over fp32 weights, as VAR's own benchmark), bf16-true (weights cast to bf16).
``scale_step`` (class-conditional part): the scale step's fast paths to compare, timed interleaved (one call of
each per round, medians over ``repeats`` rounds): plain (every fast path off: the code before them), fast (the
defaults: the exact ones), filter (+ the sort-free top-k/top-p), and on top of filter: bf16, compile,
bf16-compile, cudagraphs (compile mode reduce-overhead), bf16-cudagraphs. ``x first``
is the speed-up over the first listed; ``same codes %`` the share of its codes equal to the first one's (same
seeds; with ``top_k=1`` the greedy agreement, e.g. of bf16 with fp32);
``first s`` is the first call, compilation included.
Official VAR code on an H200 (random weights, autocast, KV cache), the bar of issue 5 for ``var=d16`` / ``d30``:
d16 6.6 img/s at batch 1 (152 ms), 146 img/s at batch 64; d30 4.2 img/s at batch 1, 58.8 img/s at batch 64.
"""

from __future__ import annotations

import contextlib
import tempfile
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
from vargpt.data.tokenizer import train_world_tokenizer
from vargpt.inference import GenerationStats, generate
from vargpt.model import build_var, build_vqvae
from vargpt.model.scale_step import ScaleStepOptions
from vargpt.model.vargpt import build_vargpt

DEFAULTS: dict[str, Any] = {
    "model": "tiny",  # conf/model/<name>.yaml or a yaml path
    "batch_sizes": [1, 8, 32, 64],
    "parts": ["images", "text", "var"],  # any of images, text, var
    "var": "model",  # class-conditional decoder: model (the VARGPT's own VAR) | dN (VAR-dN, released VQ-VAE)
    "precision": "32",  # 32 | bf16-mixed | fp16-mixed | bf16-true
    "uncond": "release",  # release | null_prompt | none
    "cfg": 1.5,
    "top_k": 900,
    "top_p": 0.96,
    "scale_step": ["fast"],  # class-conditional scale-step variants, see SCALE_STEPS
    "text_tokens": 32,  # greedy tokens per sample in the text benchmark
    "prompt": "Draw a red circle on a white background.",
    "device": "auto",
    "warmup": 1,
    "repeats": 3,
    "threads": 0,  # torch CPU threads (0: torch's default); 1 is steadier on a shared CPU
    "seed": 0,
    "json": None,  # append one JSON line per table row to this file
}
PRECISIONS = {
    "32": (torch.float32, None),
    "bf16-mixed": (torch.float32, torch.bfloat16),
    "fp16-mixed": (torch.float32, torch.float16),
    "bf16-true": (torch.bfloat16, None),
}
SCALE_STEPS = {
    "plain": ScaleStepOptions.plain(),
    "fast": ScaleStepOptions(),
    "filter": ScaleStepOptions(fast_filter=True),
    "bf16": ScaleStepOptions(fast_filter=True, bf16=True),
    "compile": ScaleStepOptions(fast_filter=True, compile="default"),
    "bf16-compile": ScaleStepOptions(fast_filter=True, bf16=True, compile="default"),
    "cudagraphs": ScaleStepOptions(fast_filter=True, compile="reduce-overhead"),
    "bf16-cudagraphs": ScaleStepOptions(fast_filter=True, bf16=True, compile="reduce-overhead"),
}
TOKENIZER_TEXTS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: Draw a red circle on a white background. ASSISTANT: Here is a red circle.",
    "USER: What color is the shape? ASSISTANT: It is a small blue square at the top left.",
] * 10


def autocast(device: torch.device, dtype: torch.dtype | None):
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def build_vargpt_model(name: str, device: torch.device, weights: torch.dtype, seed: int):
    """A random VARGPT of the model config with a throwaway BPE tokenizer (the world tokenizer's recipe)."""
    cfg = load_model_cfg(name)
    tokenizer = train_world_tokenizer(TOKENIZER_TEXTS, tempfile.mkdtemp(), vocab_size=1000)
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_vargpt(cfg, tokenizer)
    return model.to(dtype=weights).eval()


def bench_images(model, args: dict[str, Any], device: torch.device, amp: torch.dtype | None) -> None:
    keys = ("uncond", "cfg", "top_k", "top_p")
    sampling = {"max_new_tokens": 1, **{k: args[k] for k in keys}}
    rows = []
    for B in args["batch_sizes"]:
        prompts = [args["prompt"]] * B

        def call(stats=None, prompts=prompts):
            with autocast(device, amp):
                generate(model, prompts, sampling=sampling, force_image=True, return_pil=False, stats=stats)

        reset_peak_memory(device)
        latency = median(timed(call, device, args["warmup"], args["repeats"]))
        split = GenerationStats(timing=True)
        call(split)
        row = {
            "batch": B,
            "latency_ms": latency * 1e3,
            "img_s": B / latency,
            "prefill_ms": split.prefill_s * 1e3,
            "llm_scales_ms": split.llm_image_s * 1e3,
            "var_ms": split.var_s * 1e3,
            "vq_decode_ms": split.decode_s * 1e3,
            "llm_var_calls": f"{split.llm_image_calls}/{split.var_calls}",
            "peak_gib": peak_memory_gib(device),
        }
        write_json(args["json"], {"bench": "generate_images", "model": args["model"], **row, **_setting(args)})
        rows.append([_fmt(v) for v in row.values()])
    print_table(
        f"VARGPT image generation: {args['model']}, precision {args['precision']}, uncond={args['uncond']}, "
        f"cfg={args['cfg']}, top_k={args['top_k']}, top_p={args['top_p']}; one image per sample",
        [
            "batch",
            "latency ms",
            "img/s",
            "prefill ms",
            "LLM scales ms",
            "VAR ms",
            "VQ dec ms",
            "LLM/VAR calls",
            "peak GiB",
        ],
        rows,
    )


def bench_text(model, args: dict[str, Any], device: torch.device, amp: torch.dtype | None) -> None:
    eos, n = model.ids.eos, args["text_tokens"]

    def no_eos(samples, reply_ids, logits):  # a random model stops at random: measure a fixed length
        logits = logits.clone()
        logits[:, eos] = float("-inf")
        return logits

    sampling = {"max_new_tokens": n, "max_images": 0}
    rows = []
    for B in args["batch_sizes"]:
        prompts = [args["prompt"]] * B

        def call(prompts=prompts):
            with autocast(device, amp):
                generate(model, prompts, sampling=sampling, logits_processor=no_eos, return_pil=False)

        latency = median(timed(call, device, args["warmup"], args["repeats"]))
        row = {"batch": B, "latency_ms": latency * 1e3, "tokens_s": B * n / latency, "ms_step": latency / n * 1e3}
        write_json(args["json"], {"bench": "generate_text", "model": args["model"], **row, **_setting(args)})
        rows.append([_fmt(v) for v in row.values()])
    print_table(
        f"VARGPT text generation: {args['model']}, {n} greedy tokens per sample (prefill included)",
        ["batch", "latency ms", "tokens/s", "ms/step"],
        rows,
    )


def bench_class_conditional(model, args: dict[str, Any], device: torch.device, weights, amp) -> None:
    """``VAR.sample`` (VAR's autoregressive_infer_cfg) then ``codes_to_img``, as VAR's own benchmark times it, for
    every ``scale_step`` variant, interleaved."""
    spec = str(args["var"])
    variants = args["scale_step"] if isinstance(args["scale_step"], list) else [args["scale_step"]]
    unknown = sorted(set(variants) - set(SCALE_STEPS))
    if unknown:
        raise SystemExit(f"scale_step: unknown {unknown}; known: {', '.join(SCALE_STEPS)}")
    if spec == "model":
        var, vq, label, what = model.vargpt_gen, model.vae_local, model.gen_label, f"VAR of {args['model']}"
    else:
        depth = int(spec.removeprefix("d"))
        torch.manual_seed(args["seed"])
        with torch.device(device):
            vq = build_vqvae().to(dtype=weights).eval()
            var = build_var(depth, vocab_size=vq.V, z_channels=vq.Cvae, vqvae=vq).to(dtype=weights).eval()
        label, what = 0, f"VAR-d{depth} + VQ-VAE (released shapes)"
    rows = []
    for B in args["batch_sizes"]:
        labels = torch.full((B,), label, dtype=torch.long, device=device)
        seeds = [args["seed"] + i for i in range(B)]
        codes: dict[str, list[torch.Tensor]] = {}

        def sample(name: str, labels=labels, seeds=seeds, codes=codes) -> None:
            with torch.no_grad(), autocast(device, amp):
                codes[name] = var.sample(
                    labels, cfg=args["cfg"], top_k=args["top_k"], top_p=args["top_p"], seeds=seeds, vqvae=vq,
                    options=SCALE_STEPS[name],
                )  # fmt: skip

        def decode(codes=codes, first=variants[0]) -> None:
            with torch.no_grad(), autocast(device, amp):
                vq.codes_to_img(codes[first])

        first_s = {name: timed(lambda name=name: sample(name), device, 0, 1)[0] for name in variants}
        for _ in range(int(args["warmup"]) - 1):  # the first call above was the first warm-up call
            for name in variants:
                sample(name)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(int(args["repeats"])):  # interleaved rounds: A, B, A, B on a shared machine
            for name in variants:
                times[name] += timed(lambda name=name: sample(name), device, 0, 1)
        t_decode = median(timed(decode, device, 1, args["repeats"]))
        ref = median(times[variants[0]])
        for name in variants:
            t_sample = median(times[name])
            same = torch.cat(codes[name], 1).eq(torch.cat(codes[variants[0]], 1)).float().mean().item()
            row = {
                "batch": B,
                "scale_step": name,
                "latency_ms": (t_sample + t_decode) * 1e3,
                "img_s": B / (t_sample + t_decode),
                "sample_ms": t_sample * 1e3,
                "min_sample_ms": min(times[name]) * 1e3,
                "x_first": ref / t_sample,
                "same_codes_pct": 100 * same,
                "first_s": first_s[name],
                "vq_decode_ms": t_decode * 1e3,
            }
            write_json(args["json"], {"bench": "generate_var", "var": spec, **row, **_setting(args)})
            rows.append([_fmt(v) for v in row.values()])
    print_table(
        f"class-conditional {what}: precision {args['precision']}, cfg={args['cfg']}, top_k={args['top_k']}, "
        f"top_p={args['top_p']}, threads {torch.get_num_threads()}; VAR.sample + codes_to_img",
        [
            "batch",
            "scale step",
            "latency ms",
            "img/s",
            "sample ms",
            "min ms",
            "x first",
            "same codes %",
            "first s",
            "VQ dec ms",
        ],
        rows,
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if v < 100 else f"{v:.1f}"
    return str(v)


def _setting(args: dict[str, Any]) -> dict[str, Any]:
    return {k: args[k] for k in ("precision", "uncond", "cfg", "top_k", "top_p", "device")}


def main(argv: list[str] | None = None) -> None:
    args, _ = parse_args(argv, DEFAULTS, __doc__)
    if args["precision"] not in PRECISIONS:
        raise SystemExit(f"precision={args['precision']}: one of {', '.join(PRECISIONS)}")
    unknown = set(args["parts"]) - {"images", "text", "var"}
    if unknown:
        raise SystemExit(f"parts: unknown {sorted(unknown)}; known: images, text, var")
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    device = pick_device(args["device"])
    args["device"] = str(device)
    weights, amp = PRECISIONS[args["precision"]]
    print(f"device: {device_name(device)}; {environment()}")
    model = None
    if {"images", "text"} & set(args["parts"]) or args["var"] == "model":
        model = build_vargpt_model(args["model"], device, weights, args["seed"])
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model {args['model']}: {n_params / 1e6:.1f} M parameters, L = {model.num_gen_tokens} tokens per image")
    if "images" in args["parts"]:
        bench_images(model, args, device, amp)
    if "text" in args["parts"]:
        bench_text(model, args, device, amp)
    if "var" in args["parts"]:
        bench_class_conditional(model, args, device, weights, amp)


if __name__ == "__main__":
    main()
