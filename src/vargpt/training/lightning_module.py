"""The LightningModule around VARGPT (the Lightning Trainer is vargpt.training.trainer's).

The module holds no model-specific math: the model computes its losses; the stage (stage.py) decides what
trains; optim.py builds the optimizer and schedule; parallel.py shards. What is here: the stage's weighting
of the two losses, metrics averaged over the micro batches of an optimizer step and over ranks (one
collective per step), gradient clipping with the norm logged, and frozen sub-modules kept in eval mode.

The step does not wait for the device on one process: the batch's counts are taken on its host copy before
the transfer (``BatchCounts``, so the model's forward reads nothing back), the step's metrics stay device
tensors until Lightning's log steps, and the progress bar shows a host copy of the loss refreshed at those
steps (it turns its values into numbers at every micro batch).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig
from torch import nn

from vargpt.model.vargpt import HOST_COUNTS, BatchCounts
from vargpt.training.callbacks import is_log_step
from vargpt.training.optim import build_scheduler, param_groups
from vargpt.training.parallel import align_branches, apply_activation_checkpointing, shard_fsdp2
from vargpt.training.stage import apply_stage, set_frozen_eval

# Frozen sub-modules are in eval mode on purpose (stage.py); Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


def metric_names(num_scales: int) -> list[str]:
    """The step metrics, in a fixed order so that every rank reduces the same vector."""
    names = ["loss", "loss_text", "acc_text", "loss_image", "acc_image", "loss_image_tail", "acc_image_tail"]
    names += [f"{m}_image_s{k}" for k in range(num_scales) for m in ("loss", "acc")]
    # Validation only (VARGPTModule.prompt_gain).
    return names + ["prompt_gain_image"] + [f"prompt_gain_image_s{k}" for k in range(num_scales)]


class VARGPTModule(pl.LightningModule):
    """Trains a VARGPT for one stage (``cfg.stage``) with the parallelism of ``cfg.trainer``."""

    def __init__(
        self, model: nn.Module, stage: DictConfig, trainer_cfg: DictConfig, total_steps: int, seed: int
    ) -> None:
        super().__init__()
        self.model = model
        self.seed = seed
        self.stage = stage
        self.trainer_cfg = trainer_cfg
        self.total_steps = total_steps
        self.report = apply_stage(model, stage.trainable, stage.name)
        self.metric_names = metric_names(len(model.cfg.vqvae.patch_nums))
        # (sum, count) per metric since the last log, for "train" (one optimizer step) and "val" (one pass), on
        # the device; the counts also on the host (which metrics this rank saw), so that one process reads nothing.
        self._sums = {split: torch.zeros(2, len(self.metric_names)) for split in ("train", "val")}
        self._seen = {split: [0] * len(self.metric_names) for split in ("train", "val")}
        self._grad_norm: torch.Tensor | None = None
        self._configured = False

    # ------------------------------------------------------------------ parallelism
    def configure_model(self) -> None:
        """Activation checkpointing, then ``torch.compile`` of the blocks, then FSDP2 sharding, once (Lightning may
        call this more than once). The order is torchtitan's: compile sees the checkpointed blocks, and each
        compiled block becomes an FSDP unit."""
        if self._configured:
            return
        self._configured = True
        if self.trainer_cfg.activation_checkpointing:
            # A recomputed LLM layer would append its keys to the KV cache a second time (HF's own gradient
            # checkpointing turns the cache off too); training needs no cache.
            self.model.language_model.config.use_cache = False
            apply_activation_checkpointing(self.model.fsdp_units())
        if self.trainer_cfg.compile.enabled:
            compile_blocks(self.model.fsdp_units(), self.trainer_cfg.compile.mode.value)
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            mp = str(self.trainer_cfg.fsdp.mixed_precision.value)
            on_gpu_bf16 = self.trainer.strategy.root_device.type == "cuda" and "bf16" in str(self.trainer.precision)
            shard_fsdp2(
                self.model,
                self.device_mesh["data_parallel"],
                bf16=mp == "bf16" or (mp == "auto" and on_gpu_bf16),
                reshard_after_forward=self.trainer_cfg.fsdp.reshard_after_forward,
            )

    def train(self, mode: bool = True) -> VARGPTModule:
        """Lightning switches the whole module to train mode; frozen sub-modules go back to eval."""
        super().train(mode)
        if mode:
            set_frozen_eval(self.model, self.report.frozen_modules)
        return self

    # ------------------------------------------------------------------ steps
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Count the batch's slots and labels on its host copy (free there) before it moves to the device."""
        if isinstance(batch, dict) and "labels" in batch and batch["input_ids"].device.type == "cpu":
            batch = {**batch, HOST_COUNTS: BatchCounts.of(batch, self.model.ids)}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    @property
    def _sharded(self) -> bool:
        """Whether parameters are sharded over several ranks (every rank must then run the same units)."""
        return isinstance(self.trainer.strategy, ModelParallelStrategy) and self.trainer.world_size > 1

    def _forward(self, batch: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """Model outputs and the stage's loss; under sharding, every rank runs the same branches."""
        dummy_gen = False
        if self._sharded:
            aligned, dummy_gen = align_branches(batch, self.model)
            if aligned is not batch:
                aligned.pop(HOST_COUNTS, None)  # a dummy sample was added: the counts no longer hold
            batch = aligned
        out = self.model(batch)
        w = self.stage.loss_weights
        loss = w.text * out.loss_text
        if out.loss_image is not None:
            # A dummy generation sample only keeps the collectives in step: it must not teach anything.
            loss = loss + (0.0 if dummy_gen else w.image) * out.loss_image
        if dummy_gen:
            out.metrics = {k: v for k, v in out.metrics.items() if "image" not in k}
        return out, loss

    def _accumulate(self, split: str, metrics: dict[str, torch.Tensor], loss: torch.Tensor) -> None:
        values = {**metrics, "loss": loss.detach()}
        sums = self._sums[split].to(loss.device)
        for i, name in enumerate(self.metric_names):
            if name in values:
                sums[0, i] += values[name].float()
                sums[1, i] += 1
                self._seen[split][i] += 1
        self._sums[split] = sums

    def _log_means(self, split: str, **log_kwargs: Any) -> dict[str, torch.Tensor]:
        """Log the means over the accumulated batches of all ranks; a metric no rank saw is left out.

        One process reads nothing (which metrics it saw is known on the host). Several ranks: one all-reduce
        of a fixed-size vector, so ranks whose batches held different tasks still agree on it (Lightning's own
        sync would reduce metric by metric, and hang when the ranks' metric sets differ), and the reduced
        counts are read back (one sync per optimizer step): a metric only another rank saw is logged too.
        """
        sums = self._sums[split].to(self.device)
        seen = self._seen[split]
        if self.trainer.world_size > 1:
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            seen = sums[1].tolist()
        self._sums[split], self._seen[split] = torch.zeros_like(sums), [0] * len(self.metric_names)
        means = {f"{split}/{n}": sums[0, i] / seen[i] for i, n in enumerate(self.metric_names) if seen[i] > 0}
        self.log_dict(means, rank_zero_only=True, **log_kwargs)
        return means

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed from (seed, micro batch, rank): Lightning checkpoints hold no RNG state, and VAR's condition
        dropout must draw the same after a resume as in an uninterrupted run."""
        n = self.trainer.fit_loop.epoch_loop.batch_progress.total.ready
        torch.manual_seed((self.seed * 1_000_003 + n * 1_009 + self.global_rank) % 2**63)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out, loss = self._forward(batch)
        self._accumulate("train", out.metrics, loss)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.fit_loop.epoch_loop._should_accumulate():
            return
        means = self._log_means("train", on_step=True, on_epoch=False)
        if self._grad_norm is not None:
            self.log("train/grad_norm", self._grad_norm, on_step=True, on_epoch=False, rank_zero_only=True)
        if is_log_step(self.trainer):  # a host copy: the progress bar reads its values at every micro batch
            self.log("loss", means["train/loss"].cpu(), prog_bar=True, logger=False, rank_zero_only=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, loss = self._forward(batch)
        metrics = out.metrics
        if self.trainer_cfg.val_prompt_gain:
            metrics = {**metrics, **self.prompt_gain(batch, metrics)}
        self._accumulate("val", metrics, loss)

    def prompt_gain(self, batch: dict[str, Any], metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``prompt_gain_image[_s<k>]``: how much higher each scale's image CE is when every generation target
        is paired with another sample's prompt (the targets rolled by one over the batch's generation images, so
        each lands in the next image's slot: another sample's, unless one conversation holds both).

        Teacher forcing gives each image its own prefix either way, so the gain measures what the prompt adds
        to the image's own earlier scales: near 0 at a scale means the LLM's hidden states there do not carry
        the instruction (VARGPT conditions the VAR through them only). Empty for fewer than two targets.
        """
        key = "gen_codes" if batch.get("gen_codes") is not None else "pixel_gen_values"
        targets = batch.get(key)
        n = 0 if targets is None else targets.shape[0]
        if n < 2 and not self._sharded:
            return {}
        # Sharded ranks all run the second forward (their collectives must match); a short batch scores itself.
        shuffled, _ = self._forward({**batch, key: targets.roll(1, 0)} if n >= 2 else batch)
        if n < 2 or "loss_image" not in shuffled.metrics:
            return {}
        names = ["loss_image"] + [f"loss_image_s{k}" for k in range(len(self.model.cfg.vqvae.patch_nums))]
        return {name.replace("loss_", "prompt_gain_"): shuffled.metrics[name] - metrics[name] for name in names}

    def on_validation_epoch_end(self) -> None:
        self._log_means("val", on_step=False, on_epoch=True)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW over the trainable parameters (as sharded, if sharded) with the stage's groups and schedule."""
        opt_cfg = self.stage.optimizer
        groups = param_groups(self.model, opt_cfg.lr, opt_cfg.weight_decay, self.stage.lr_by_module)
        optimizer = instantiate(opt_cfg, betas=tuple(opt_cfg.betas))(groups)
        sched = self.stage.scheduler
        scheduler = build_scheduler(
            optimizer, self.total_steps, sched.warmup_ratio, str(sched.name.value), sched.min_lr_ratio
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None, **_: Any) -> None:
        """Clip to ``stage.grad_clip`` (0 = no clipping) and keep the pre-clip norm for logging."""
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        max_norm = self.stage.grad_clip if self.stage.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # Under FSDP2 the norm is a DTensor; the logger wants a plain tensor.
        self._grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def compile_blocks(blocks: list[nn.Module], mode: str) -> None:
    """``torch.compile`` each block in place (regional compilation: the blocks of a kind share one graph, so it
    compiles in the time of one block, not of the model; ``module.compile()`` keeps parameter names)."""
    for block in blocks:
        block.compile(mode=mode)
