"""Training-step throughput of VARGPT: step time, samples/s, tokens/s, MFU, peak memory, data wait. Not a test.

    python -m bench.train_step                                   # tiny, stage sft_gen, micro batch 8, CPU/GPU
    python -m bench.train_step stage=sft_mixed micro_batch_size=1,4,16       # a sweep: one row per value
    python -m bench.train_step model=vargpt_llava_7b model.llm.num_hidden_layers=4 precision=bf16-mixed
    python -m bench.train_step data=shapes                       # real batches from vargpt.data (data wait)
    python -m bench.train_step --help

Arguments are Hydra-style ``key=value``; a comma list (``micro_batch_size=1,8``) sweeps that argument, one table
row per combination. ``model=`` names ``conf/model/<name>.yaml`` or a yaml path; ``model.<key>=<value>``
overrides it (e.g. ``model.llm.num_hidden_layers=4`` to fit a 7B-width model on one GPU: say so when reporting).
``stage=`` applies ``conf/stage/<stage>.yaml``'s trainable set with ``vargpt.training.stage.apply_stage``.

What one step is: forward (the model's losses) + backward + gradient clipping at the stage's ``grad_clip`` +
AdamW over the trainable parameters + ``zero_grad``, as the LightningModule does, under ``precision``:
``32`` (fp32), ``bf16-mixed`` (autocast, fp32 weights and optimizer, what ``trainer=gpu`` uses) or
``bf16-true`` (weights in bf16 except the VQ-VAE, like the compute copy FSDP2's bf16 policy all-gathers).

Synthetic batches (``data=synthetic``) follow the collator's contract (vargpt.data.collate): understanding rows
``<s> words <image>*P words reply </s>`` of ``seq_len`` tokens (labels on the reply, ``reply_frac`` of the
text), generation rows ``<s> words <gen_start> <gen_pad>*L <gen_end> </s>``; ``gen_frac`` of the micro batch
are generation rows. ``len_jitter`` draws understanding lengths uniformly in [(1 - j) seq_len, seq_len] to show
what padding costs (``pad %``). ``codes=true`` feeds precomputed VQ codes (``gen_codes``) instead of pixels.
The batch sits on the device before timing, so data wait is 0; ``data=shapes`` pulls batches from
``VARGPTDataModule`` over the shapes world (built under ``data_root`` when missing) with ``data_workers``
workers and reports the time the step waited for each batch; ``group_by=length,modality_length`` batches it with
length grouping (``data.group_by``).

Reported (medians over ``steps`` timed steps after ``warmup``; ``min ms`` the fastest step, the better figure
on a shared machine): ``step ms`` (forward+backward+optimizer, with ``fwd``/``bwd``/``opt`` from CUDA events or
CPU clocks), ``data wait ms``, ``samples/s`` and ``tokens/s``
(real, unpadded LLM tokens) over step + wait, ``TFLOP/s`` and ``MFU %`` = model FLOPs of the step / time /
peak. FLOPs come from ``vargpt.training.flops`` (VARGPTFlops):

    per part c (vision tower, projectors, LLM, LM head, VAR blocks...), per token:
        2 N_c forward + 2 N_c backward-through-activations (only where a gradient flows: c or a part upstream
        of c trains) + 2 N_c,trainable weight gradients
      -> 6N for a trained part, 4N for a frozen part on the gradient path, 2N for a frozen part off it;
    attention: 4 d x pairs forward (causal n(n+1)/2 per LLM row of n real tokens, (P+1)^2 per vision image,
      VAR block-causal 286,434 pairs per 256-px image), 2x that backward where a gradient flows;
    VAR AdaLN projections per image; the LM head per labelled token; VQ-VAE encoding reported apart, not in MFU.

The peak is the GPU's datasheet dense bf16 (or tf32 for ``precision=32``) FLOP/s, or on a CPU the best
measured 1024^3 matmul in this process (so CPU MFU reads "fraction of this CPU's matmul speed"); override
with ``peak_tflops=``. Peak memory: CUDA ``max_memory_allocated`` over the timed steps, or on a CPU the
process's peak RSS over the timed steps (it includes the Python/torch baseline, printed below the table).
``step mem MiB`` = the step's peak minus the memory held just before it (weights, optimizer state, batch): its
activations, gradients and temporaries (on a CPU from the RSS, with glibc told to return freed memory).
``interleave=true`` builds every configuration of a sweep first and runs their steps in turns, so a shared
machine's changing load hits all of them alike (use it on a shared CPU; on a GPU they must fit together).
``sync_debug=true`` (CUDA) counts the host-device synchronisations of one step and where they happen.
``json=PATH`` appends one JSON line per row.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    ROOT,
    PhaseTimer,
    cpu_memory_returns_to_os,
    current_memory_gib,
    device_name,
    environment,
    load_model_cfg,
    load_stage,
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
from bench.train_batches import make_batch, shapes_loader, synthetic_ids, to_device
from vargpt.model import build_vargpt
from vargpt.tokens import SpecialTokenIds
from vargpt.training.flops import BatchShape, VARGPTFlops, describe_parts, measure_flops
from vargpt.training.stage import apply_stage

DEFAULTS: dict[str, Any] = {
    "model": "tiny",
    "stage": "sft_gen",
    "micro_batch_size": 8,
    "seq_len": 0,  # understanding row length; 0 = P + 128 (capped by max_position_embeddings)
    "gen_frac": -1.0,  # share of generation rows; -1 = the stage's default (pretrain/sft_gen 1, sft_mixed 0.25)
    "gen_prompt_len": 16,
    "reply_frac": 0.5,
    "len_jitter": 0.0,
    "codes": False,
    "precision": "32",
    "compile": False,  # false | true (= blocks: each LLM layer, VAR block, vision layer) | model
    "activation_checkpointing": False,
    "fused_adam": False,
    "device": "auto",
    "steps": 5,
    "warmup": 2,
    "data": "synthetic",  # synthetic | shapes
    "data_workers": 2,
    "group_by": "none",  # data=shapes: data.group_by (none | length | modality_length), pools of 16 batches
    "data_root": str(ROOT / "data"),
    "shapes_train": 2000,
    "peak_tflops": None,
    "sync_debug": False,
    "show_flops": True,
    "interleave": False,
    "seed": 0,
    "json": None,
}
SWEEPABLE = (
    "stage",
    "micro_batch_size",
    "seq_len",
    "gen_frac",
    "len_jitter",
    "codes",
    "precision",
    "compile",
    "activation_checkpointing",
    "fused_adam",
    "group_by",
)
STAGE_GEN_FRAC = {"pretrain": 1.0, "sft_mixed": 0.25, "sft_gen": 1.0}


def build(args: dict[str, Any], model_overrides: list[str], device: torch.device, ids: Any = None) -> tuple[Any, Any]:
    """The model on ``device`` with the stage applied, AC / compile / precision set; and its stage report."""
    cfg = load_model_cfg(args["model"], model_overrides)
    ids = ids or synthetic_ids(cfg.llm.vocab_size)
    torch.manual_seed(int(args["seed"]))
    with torch.device(device):
        model = build_vargpt(cfg, ids)
    if args["precision"] == "bf16-true":
        model.to(torch.bfloat16)
        model.vae_local.float()  # the tokenizer codes in fp32 (VARGPT-REFERENCE.md 9.8)
    model.train()
    stage = load_stage(args["stage"])
    report = apply_stage(model, stage["trainable"], stage["name"])
    if args["activation_checkpointing"]:
        # As VARGPTModule.configure_model: a recomputed LLM layer would append to the KV cache a second time.
        model.language_model.config.use_cache = False
        try:
            from vargpt.training.parallel import apply_activation_checkpointing
        except ImportError:  # no lightning: the same composable checkpoint the training code applies

            def apply_activation_checkpointing(units: list[Any]) -> None:
                from torch.distributed._composable import checkpoint

                for unit in units:
                    checkpoint(unit)

        apply_activation_checkpointing(model.fsdp_units())
    mode = args["compile"]
    if mode in (True, "true", "blocks"):
        for unit in model.fsdp_units():
            unit.compile()
    elif mode == "model":
        model.compile()
    elif mode not in (False, "false", None):
        raise SystemExit(f"compile={mode!r}: false | true | blocks | model")
    return model, (stage, report)


def make_optimizer(model: Any, stage: dict[str, Any], fused: bool) -> torch.optim.Optimizer:
    opt = stage["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    kw: dict[str, Any] = {"fused": True} if fused else {}
    return torch.optim.AdamW(
        params,
        lr=float(opt["lr"]),
        betas=tuple(opt["betas"]),
        eps=float(opt["eps"]),
        weight_decay=float(opt["weight_decay"]),
        **kw,
    )


def autocast(device: torch.device, precision: str) -> Any:
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if precision in ("32", "32-true", "bf16-true"):
        return contextlib.nullcontext()
    raise SystemExit(f"precision={precision!r}: 32 | bf16-mixed | bf16-true")


def count_syncs(step: Any) -> Counter:
    """Host-device synchronisations of one call of ``step`` (CUDA sync debug mode), by source line."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower())


class Runner:
    """One configuration: the model, optimizer, batches and FLOP counter, built once; ``timed_step`` measures one
    step and ``result`` sums them up. Several runners can take turns (``interleave=true``)."""

    def __init__(self, args: dict[str, Any], model_overrides: list[str], device: torch.device) -> None:
        self.args, self.device = args, device
        self.host_iter = None
        ids = None
        if args["data"] == "shapes":
            tokenizer, self.host_iter = shapes_loader(args, load_model_cfg(args["model"], model_overrides))
            ids = SpecialTokenIds.from_tokenizer(tokenizer)
        elif args["data"] != "synthetic":
            raise SystemExit(f"data={args['data']!r}: synthetic | shapes")
        self.model, (self.stage, self.report) = build(args, model_overrides, device, ids)
        model = self.model
        if not args["seq_len"]:
            args["seq_len"] = min(model.num_image_tokens + 128, model.cfg.llm.max_position_embeddings)
        if float(args["gen_frac"]) < 0:
            args["gen_frac"] = STAGE_GEN_FRAC.get(self.stage["name"], 0.5)
        self.optimizer = make_optimizer(model, self.stage, bool(args["fused_adam"]))
        self.grad_clip = float(self.stage.get("grad_clip") or 0.0)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.precision = str(args["precision"])
        vq_flops = 0.0
        if not args["codes"] and (args["gen_frac"] > 0 or args["data"] == "shapes"):
            R = model.cfg.vqvae.image_size
            vq_flops = measure_flops(model.vae_local.img_to_codes, torch.zeros(1, 3, R, R, device=device))
        self.counter = VARGPTFlops(model, vq_encode_flops=vq_flops)
        self.fixed = None
        if self.host_iter is None:
            host = make_batch(model, args, int(args["seed"]))
            self.fixed = (to_device(host, device, model.ids), BatchShape.from_batch(host))
            sync(device)
        self.times: dict[str, list[float]] = {k: [] for k in ("step", "fwd", "bwd", "opt", "wait")}
        self.flops: list[float] = []
        self.tokens: list[int] = []
        self.padded: list[int] = []
        self.samples: list[int] = []
        self.step_mem: list[float] = []
        self.peak = 0.0
        self.base = float("nan")
        self.last_count = None

    def next_batch(self) -> tuple[dict[str, Any], BatchShape, float]:
        if self.fixed is not None:
            return self.fixed[0], self.fixed[1], 0.0
        t0 = time.perf_counter()
        host = next(self.host_iter)
        wait = time.perf_counter() - t0
        if self.args["codes"] and host.get("pixel_gen_values") is not None:
            # What a loader serving precomputed codes would hand over (encoded here, outside the timings).
            with torch.no_grad():
                codes = self.model.vae_local.img_to_codes(host["pixel_gen_values"].to(self.device))
            host["gen_codes"], host["pixel_gen_values"] = torch.cat(codes, 1).cpu(), None
        return to_device(host, self.device, self.model.ids), BatchShape.from_batch(host), wait

    def step(self, batch: dict[str, Any], timer: PhaseTimer | None = None) -> None:
        if timer:
            timer.mark("start")
        with autocast(self.device, self.precision):
            out = self.model(batch)
        if timer:
            timer.mark("fwd")
        out.loss.backward()
        if timer:
            timer.mark("bwd")
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if timer:
            timer.mark("opt")

    def warm(self) -> None:
        for _ in range(int(self.args["warmup"])):
            self.step(self.next_batch()[0])
        sync(self.device)
        gc.collect()
        self.base = current_memory_gib(self.device)

    def timed_step(self) -> None:
        batch, shape, wait = self.next_batch()
        timer = PhaseTimer(self.device)
        sync(self.device)
        before = current_memory_gib(self.device)
        reset_peak_memory(self.device)
        t0 = time.perf_counter()
        self.step(batch, timer)
        sync(self.device)
        self.times["step"].append(time.perf_counter() - t0)
        peak = peak_memory_gib(self.device)
        self.peak = max(self.peak, peak)
        self.step_mem.append(peak - before)
        for k, v in timer.seconds().items():
            self.times[k].append(v)
        self.times["wait"].append(wait)
        self.last_count = self.counter(shape)
        self.flops.append(self.last_count.total)
        self.tokens.append(shape.real_tokens)
        self.padded.append(shape.padded_tokens)
        self.samples.append(shape.samples)

    def result(self) -> dict[str, Any]:
        args, times = self.args, self.times
        syncs: Counter | None = None
        if args["sync_debug"] and self.device.type == "cuda":
            b = self.next_batch()[0]
            syncs = count_syncs(lambda: self.step(b))
        # Rates over the summed time of all timed steps (steps of different batches weigh by their length).
        total_time = sum(times["step"]) + sum(times["wait"])
        peak_fl, peak_src = peak_flops(self.device, self.precision.startswith("bf16"), args["peak_tflops"])
        achieved = sum(self.flops) / sum(times["step"])
        return {
            "step_ms": 1e3 * median(times["step"]),
            "min_step_ms": 1e3 * min(times["step"]),
            "fwd_ms": 1e3 * median(times["fwd"]),
            "bwd_ms": 1e3 * median(times["bwd"]),
            "opt_ms": 1e3 * median(times["opt"]),
            "data_wait_ms": 1e3 * median(times["wait"]),
            "samples_per_s": sum(self.samples) / total_time,
            "tokens_per_s": sum(self.tokens) / total_time,
            "pad_pct": 100.0 * (1 - sum(self.tokens) / max(1, sum(self.padded))),
            "tflops": achieved / 1e12,
            "mfu_pct": 100.0 * achieved / peak_fl,
            "peak_gib": self.peak,
            "base_gib": self.base,
            "step_mem_mib": 1024 * max(self.step_mem),
            "peak_source": peak_src,
            "peak_tflops": peak_fl / 1e12,
            "gflop_per_step": sum(self.flops) / len(self.flops) / 1e9,
            "trainable": self.report.num_trainable,
            "frozen": self.report.num_frozen,
            "seq_len": args["seq_len"],
            "gen_frac": args["gen_frac"],
            "stage_name": self.stage["name"],
            "syncs": dict(syncs) if syncs is not None else None,
            "times": times,
            "_flops": self.last_count,
            "_parts": describe_parts(self.counter.m),
        }


HEADER = [
    "stage",
    "mbs",
    "seq",
    "gen",
    "prec",
    "AC",
    "compile",
    "codes",
    "group",
    "step ms",
    "min ms",
    "fwd ms",
    "bwd ms",
    "opt ms",
    "data wait ms",
    "samples/s",
    "tokens/s",
    "pad %",
    "TFLOP/s",
    "MFU %",
    "peak GiB",
    "step mem MiB",
]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args, extra = parse_args(argv, DEFAULTS, __doc__)
    model_overrides = extra["model."]
    device = pick_device(args["device"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        cpu_memory_returns_to_os()
    sweep = {k: args[k] if isinstance(args[k], list) else [args[k]] for k in SWEEPABLE}
    print(f"device: {device_name(device)}; {environment()}")
    print(f"model: {args['model']} {' '.join(model_overrides)}; data: {args['data']}")
    runs = [dict(args, **dict(zip(sweep, combo, strict=True))) for combo in itertools.product(*sweep.values())]
    steps = int(args["steps"])
    done: list[dict[str, Any]] = []
    if args["interleave"]:
        # All configurations live at once and take turns step by step, so that a shared machine's load
        # drifts over all of them alike (CPU; on a GPU they must fit together).
        runners = [Runner(run, model_overrides, device) for run in runs]
        for r in runners:
            r.warm()
        for _ in range(steps):
            for r in runners:
                r.timed_step()
        done = [r.result() for r in runners]
        del runners
    else:
        for run in runs:
            r = Runner(run, model_overrides, device)
            r.warm()
            for _ in range(steps):
                r.timed_step()
            done.append(r.result())
            del r
            gc.collect()  # this configuration's model and optimizer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    rows, results = [], []
    for run, res in zip(runs, done, strict=True):
        record = dict(run) | {k: v for k, v in res.items() if not k.startswith("_") and k != "times"}
        record.update(device=device_name(device), model_overrides=model_overrides, bench="train_step")
        record["env"] = environment()
        write_json(args["json"], record)
        results.append(res | {"args": run})
        rows.append(
            [
                str(res["stage_name"]),
                str(run["micro_batch_size"]),
                str(run["seq_len"]) if run["data"] == "synthetic" else "data",
                f"{float(run['gen_frac']):g}" if run["data"] == "synthetic" else "data",
                str(run["precision"]),
                "on" if run["activation_checkpointing"] else "off",
                str(run["compile"]).lower(),
                "yes" if run["codes"] else "no",
                str(run["group_by"] or "none") if run["data"] == "shapes" else "-",
                f"{res['step_ms']:.1f}",
                f"{res['min_step_ms']:.1f}",
                f"{res['fwd_ms']:.1f}",
                f"{res['bwd_ms']:.1f}",
                f"{res['opt_ms']:.1f}",
                f"{res['data_wait_ms']:.1f}",
                f"{res['samples_per_s']:.2f}",
                f"{res['tokens_per_s']:.0f}",
                f"{res['pad_pct']:.1f}",
                f"{res['tflops']:.3f}",
                f"{res['mfu_pct']:.1f}",
                f"{res['peak_gib']:.3f}",
                f"{res['step_mem_mib']:.1f}",
            ]
        )
    first = results[0]
    if args["show_flops"]:
        print_table(
            f"parts of {args['model']} under stage {first['stage_name']} "
            f"({first['trainable']:,} trainable, {first['frozen']:,} frozen parameters)",
            ["part", "params M", "trainable", "grad flows", "MAC/token M", "MAC/sample M"],
            first["_parts"],
        )
        print_table(
            f"model FLOPs of one step (first configuration, {first['gflop_per_step']:.3f} GFLOP)",
            ["part", "fwd GFLOP", "bwd GFLOP", "% of total"],
            first["_flops"].rows(),
        )
    print_table(
        f"training step ({args['model']}, {device_name(device)}, data {args['data']}, "
        f"medians of {args['steps']} steps after {args['warmup']} warm-up)",
        HEADER,
        rows,
    )
    peak_note = f"peak {first['peak_tflops']:.3f} TFLOP/s ({first['peak_source']})"
    if device.type == "cpu":
        peak_note += f"; CPU peak GiB is the process's peak RSS, of which {first['base_gib']:.3f} GiB before the steps"
    print(peak_note)
    print(
        "step mem MiB: peak minus the memory held between steps (weights, optimizer state, batch): activations, "
        "gradients and temporaries of one step"
    )
    for res in results:
        if res["syncs"] is not None:
            n = sum(res["syncs"].values())
            where = ", ".join(f"{k} x{v}" for k, v in sorted(res["syncs"].items()))
            print(f"host syncs in one step ({res['stage_name']}, mbs {res['args']['micro_batch_size']}): {n}: {where}")
    if any(math.isnan(r["mfu_pct"]) for r in results):
        print("MFU is nan: unknown device peak; pass peak_tflops=")
    return results


if __name__ == "__main__":
    main()
