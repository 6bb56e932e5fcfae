"""Training callbacks: throughput, MFU and peak memory while training, and the end-of-run summary.

MFU needs the FLOPs of a step. ``StepFlops`` counts them from the batch (real token counts, not a fixed
shape) and the model's matmul parameters per component, with the 2N-per-token rule plus attention terms:
forward 2N per token; backward 2N more where a gradient must flow through the component's inputs (a
trainable part upstream of it, or inside it) and 2N_trainable for weight gradients. So a frozen LLM that
stage 1 back-propagates through costs 4N per token, a frozen vision tower 2N, a trained LLM 6N. The frozen
VQ-VAE encoder (a tokenizer, convolutions) is not counted. Rates come from Lightning's ``Throughput`` (a
window of optimizer steps) and the device's peak from ``get_available_flops``.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import Throughput, get_available_flops
from lightning.pytorch.callbacks import Callback
from torch import nn

# Data flow of VARGPT's components (VARGPT-REFERENCE.md 2.2, 3): component -> (module prefixes, upstream).
# The VAR decoder's input side (embeddings, condition) is separate from its blocks: the LLM sits between them.
COMPONENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vision_tower": (("vision_tower",), ()),
    "multi_modal_projector": (("multi_modal_projector",), ("vision_tower",)),
    "var_embed": (
        tuple(f"vargpt_gen.{n}" for n in ("word_embed", "class_emb", "pos_start", "pos_1LC", "lvl_embed")),
        (),
    ),
    "image_gen_projector": (("image_gen_projector",), ("var_embed",)),
    "language_model": (("language_model.model",), ("multi_modal_projector", "image_gen_projector")),
    "lm_head": (("language_model.lm_head",), ("language_model",)),
    "image_gen_projector_out": (("image_gen_projector_out",), ("language_model",)),
    "var_decoder": (
        ("vargpt_gen.blocks", "vargpt_gen.head_nm", "vargpt_gen.head"),
        ("image_gen_projector_out", "var_embed"),
    ),
}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class StepFlops:
    """Training FLOPs of a micro batch of VARGPT, for the stage's trainable set."""

    def __init__(self, model: nn.Module) -> None:
        cfg = model.cfg
        matmul: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
        trained: dict[str, int] = dict.fromkeys(COMPONENTS, 0)
        any_trainable: dict[str, bool] = dict.fromkeys(COMPONENTS, False)
        for mod_name, module in model.named_modules():
            for leaf, p in module.named_parameters(recurse=False):
                name = f"{mod_name}.{leaf}" if mod_name else leaf
                for comp, (prefixes, _) in COMPONENTS.items():
                    if not _under(name, prefixes):
                        continue
                    any_trainable[comp] |= p.requires_grad
                    # Lookup tables cost no FLOPs; linear and (patch) conv weights do, once per token.
                    if leaf == "weight" and isinstance(module, nn.Linear | nn.Conv2d):
                        matmul[comp] += p.numel()
                        trained[comp] += p.numel() * p.requires_grad
        self.matmul, self.trained = matmul, trained
        self.needs_input_grad = {c: self._grad_flows_in(c, any_trainable) for c in COMPONENTS}
        var = model.vargpt_gen
        self.var_layers, self.var_dim = len(var.blocks), var.C
        patch_nums = list(cfg.vqvae.patch_nums)
        self.L = sum(p * p for p in patch_nums)
        # Block-causal attention: a token of scale k attends to all tokens of scales <= k.
        cum, ctx = 0, 0
        for p in patch_nums:
            cum += p * p
            ctx += p * p * cum
        self.var_ctx = ctx / self.L
        self.vis_layers, self.vis_dim = cfg.vision.num_hidden_layers, cfg.vision.hidden_size
        self.vis_tokens = cfg.vision.num_image_tokens + 1  # + CLS
        self.llm_layers, self.llm_dim = cfg.llm.num_hidden_layers, cfg.llm.hidden_size

    @staticmethod
    def _grad_flows_in(comp: str, any_trainable: dict[str, bool]) -> bool:
        """Whether backward must compute gradients w.r.t. the component's inputs or internals."""

        def output_needs_grad(c: str) -> bool:
            return any_trainable[c] or any(output_needs_grad(u) for u in COMPONENTS[c][1])

        return any_trainable[comp] or any(output_needs_grad(u) for u in COMPONENTS[comp][1])

    def _cost(self, comp: str, tokens: float, attn_fwd: float = 0.0) -> float:
        fwd = 2.0 * self.matmul[comp] * tokens
        ig = self.needs_input_grad[comp]
        linear = fwd * (1.0 + ig) + 2.0 * self.trained[comp] * tokens
        return linear + attn_fwd * (1.0 + 2.0 * ig)

    def __call__(self, batch: dict[str, Any]) -> float:
        ids = batch["input_ids"]
        B, T = ids.shape
        n_und = 0 if batch.get("pixel_values") is None else batch["pixel_values"].shape[0]
        if batch.get("gen_codes") is not None:
            n_gen = batch["gen_codes"].shape[0]
        else:
            n_gen = 0 if batch.get("pixel_gen_values") is None else batch["pixel_gen_values"].shape[0]
        n_labels = float((batch["labels"][:, 1:] != -100).sum())
        vis_tok, gen_tok = n_und * self.vis_tokens, n_gen * self.L
        return (
            self._cost("vision_tower", vis_tok, 4.0 * self.vis_layers * self.vis_dim * self.vis_tokens * vis_tok)
            + self._cost("multi_modal_projector", n_und * (self.vis_tokens - 1))
            + self._cost("var_embed", gen_tok)
            + self._cost("image_gen_projector", gen_tok)
            # Causal attention over the padded sequence: on average T/2 keys per query.
            + self._cost("language_model", B * T, 4.0 * self.llm_layers * self.llm_dim * (T / 2) * B * T)
            + self._cost("lm_head", n_labels)
            + self._cost("image_gen_projector_out", gen_tok)
            + self._cost("var_decoder", gen_tok, 4.0 * self.var_layers * self.var_dim * self.var_ctx * gen_tok)
        )


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class RunStats:
    """Totals of a run for the summary: samples and tokens of all ranks, kept across resumes."""

    steps: int = 0
    samples: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    peak_memory_gib: float = 0.0
    mfu: float | None = None


class ThroughputMonitor(Callback):
    """Logs perf/{step_time, samples_per_sec, tokens_per_sec, tflops_per_sec, mfu, peak_memory_gib} per step."""

    def __init__(self, window: int = 10) -> None:
        self.window = max(2, window)
        self.stats = RunStats()
        self._flops: StepFlops | None = None
        self._micro = {"samples": 0, "tokens": 0, "flops": 0.0}
        self._local = {"samples": 0, "tokens": 0}
        self._t0 = self._t_last = 0.0
        self._steps_here = 0

    def state_dict(self) -> dict[str, Any]:
        return {"samples": self.stats.samples, "tokens": self.stats.tokens, "seconds": self.stats.train_seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stats.samples, self.stats.tokens = state["samples"], state["tokens"]
        self.stats.train_seconds = state["seconds"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flops = StepFlops(pl_module.model)
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        self.available = get_available_flops(trainer.strategy.root_device, dtype)
        self.throughput = Throughput(
            available_flops=self.available, world_size=trainer.world_size, window_size=self.window
        )
        self._base_seconds = self.stats.train_seconds
        self._t0 = self._t_last = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mask = batch.get("attention_mask")
        self._micro["samples"] += batch["input_ids"].shape[0]
        self._micro["tokens"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        self._micro["flops"] += self._flops(batch)
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        step_time, self._t_last = now - self._t_last, now
        self._steps_here += 1
        for k in ("samples", "tokens"):
            self._local[k] += self._micro[k]
        self.throughput.update(
            time=now - self._t0,
            batches=self._steps_here,
            samples=self._local["samples"],
            lengths=self._local["tokens"],
            flops=self._micro["flops"],
        )
        world = trainer.world_size
        metrics = {"perf/step_time": step_time, "perf/peak_memory_gib": peak_memory_gib(trainer.strategy.root_device)}
        rates = self.throughput.compute()
        if "device/samples_per_sec" in rates:
            metrics["perf/samples_per_sec"] = rates["device/samples_per_sec"] * world
            metrics["perf/tokens_per_sec"] = rates["device/items_per_sec"] * world
        if "device/flops_per_sec" in rates:
            metrics["perf/tflops_per_sec_per_device"] = rates["device/flops_per_sec"] / 1e12
        if "device/mfu" in rates:
            metrics["perf/mfu"] = rates["device/mfu"]
            self.stats.mfu = rates["device/mfu"]
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
        # Exact totals over ranks (their batches differ in length): one small all-reduce per step.
        counts = torch.tensor([self._micro["samples"], self._micro["tokens"]], device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        self.stats.samples += int(counts[0])
        self.stats.tokens += int(counts[1])
        self._micro = {"samples": 0, "tokens": 0, "flops": 0.0}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.stats.steps = trainer.global_step
        self.stats.train_seconds = self._base_seconds + time.perf_counter() - self._t0
        self.stats.peak_memory_gib = peak_memory_gib(trainer.strategy.root_device)


def format_summary(
    stats: RunStats, final: dict[str, float], checkpoint: str, export: str | None, tracking: str, status: str
) -> str:
    """The few lines a run ends with."""
    secs = max(stats.train_seconds, 1e-9)
    lines = [
        f"== {status} ==",
        f"  optimizer steps   {stats.steps:,}",
        f"  samples seen      {stats.samples:,}",
        f"  tokens seen       {stats.tokens:,}",
        f"  training time     {secs:,.1f} s",
        f"  throughput        {stats.samples / secs:,.2f} samples/s, {stats.tokens / secs:,.0f} tokens/s",
        f"  peak memory       {stats.peak_memory_gib:.2f} GiB",
    ]
    if stats.mfu is not None:
        lines.append(f"  MFU               {100 * stats.mfu:.1f} %")
    if final:
        lines.append("  final losses      " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(final.items())))
    lines.append(f"  checkpoint        {checkpoint}")
    if export:
        lines.append(f"  exported model    {export}")
    lines.append(f"  tracking          {tracking}")
    return "\n".join(lines)


class RunSummary(Callback):
    """Prints and records the end-of-run summary (rank 0), inside the training process so every launcher
    (spawned ranks included) reports it; the text lands in ``<run_dir>/summary.txt`` and in MLflow."""

    def __init__(self, throughput: ThroughputMonitor, end: Any, export: Any, run_dir: Any, location: Any) -> None:
        self.throughput, self.end, self.export = throughput, end, export
        self.run_dir, self.location = run_dir, location
        self.text = ""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        stats = self.throughput.stats
        final = {
            k.removeprefix("train/"): float(v)
            for k, v in trainer.callback_metrics.items()
            if k in ("train/loss", "train/loss_text", "train/loss_image", "train/loss_image_tail", "val/loss")
        }
        preempted = self.end.preempted_at is not None
        status = f"PREEMPTED at step {self.end.preempted_at}: rerun the same command to resume" if preempted else "DONE"
        export_dir = getattr(self.export, "export_dir", None)
        self.text = format_summary(
            stats,
            final,
            str(self.end.last),
            str(export_dir) if export_dir else None,
            self.location(trainer.logger),
            status,
        )
        print(self.text, flush=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "summary.txt").write_text(self.text + "\n")
        if trainer.logger is not None:
            summary = {
                "summary/samples": stats.samples,
                "summary/tokens": stats.tokens,
                "summary/seconds": stats.train_seconds,
            }
            summary["summary/peak_memory_gib"] = stats.peak_memory_gib
            if stats.mfu is not None:
                summary["summary/mfu"] = stats.mfu
            trainer.logger.log_metrics(summary, step=trainer.global_step)
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "log_artifact") and hasattr(trainer.logger, "run_id"):
                experiment.log_artifact(trainer.logger.run_id, str(self.run_dir / "summary.txt"))
