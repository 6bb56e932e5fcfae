"""The LightningModule of a preference stage (``stage.preference``): VARGPT-v1.1's DPO on chosen / rejected pairs.

It is the VARGPT module (parallelism, metric reduction, optimizer, clipping, seeding, frozen parts in eval mode)
with another step: a pair batch (vargpt.data.collate ``PairCollator``: the B chosen rows, then the B rejected
rows, in one padded batch, so that sharded ranks run the same shapes) goes through the policy once; the model's
:meth:`~vargpt.model.vargpt.VARGPT.sequence_logps` gives each row's summed log-probability of its image codes
(or text), and :func:`vargpt.training.preference.preference_loss` compares the pair's two rows with the
reference model's.

The reference's log-probabilities are either in the batch (``ref_logps``, precomputed once into the shards by
``python -m vargpt.preference.reference_logps``: no second model in memory, the default) or computed here by a
frozen copy of the starting model. The copy is not a sub-module: it is neither trained, checkpointed nor sharded
(at 7B use the precomputed route). Drop-path is off in the policy, as TRL's ``disable_dropout``: policy and
reference must be the same function of their weights, so that a policy equal to its reference has the loss
``log 2`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig
from torch import nn
from torch.distributed.fsdp import register_fsdp_forward_method

from vargpt.checkpoint.io import state_sha256
from vargpt.data.shards import read_manifest
from vargpt.model.var_blocks import DropPath
from vargpt.training.lightning_module import VARGPTModule
from vargpt.training.preference import PREFERENCE_METRICS, PreferenceSettings, preference_loss


def preference_settings(stage: DictConfig) -> PreferenceSettings:
    """The loss settings of ``stage.preference``."""
    p = stage.preference
    return PreferenceSettings(
        loss_type=str(getattr(p.loss_type, "value", p.loss_type)),
        beta=float(p.beta),
        ftx=float(p.ftx),
        simpo_gamma=float(p.simpo_gamma),
        label_smoothing=float(p.label_smoothing),
    )


def pair_logps(model: nn.Module, batch: dict[str, Any], target: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs, position counts) of a pair batch as (B, 2): column 0 chosen, column 1 rejected."""
    sums, counts = model.sequence_logps(batch, target)
    return _as_pairs(sums, batch), _as_pairs(counts, batch)


def _as_pairs(values_R: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """(2B,) in the pair batch's row order (chosen rows, then rejected rows) -> (B, 2)."""
    B = int(batch["pair_size"])
    if values_R.shape[0] != 2 * B:
        raise ValueError(f"a pair batch of {B} pairs has {values_R.shape[0]} rows, expected {2 * B}")
    return values_R.view(2, B).T


def check_precomputed_reference(model: nn.Module, sources: Mapping[str, Path], expected: Mapping[str, Any]) -> None:
    """Refuse pair sources whose ``ref_logps`` another model than ``model`` (the stage's start) computed, or that
    were computed with other ``expected`` settings (``target``, ``gen_codes``, ``gen_resize_ratio``): DPO against
    the wrong reference trains towards the wrong target without any error. A source without a ``reference``
    block in its manifest has no ref_logps; its first batch says so."""
    digest = None
    for name, path in sources.items():
        block = read_manifest(path).get("reference")
        if block is None:
            continue
        for key, value in expected.items():
            if key in block and block[key] != value:
                raise ValueError(
                    f"data source {name} ({path}): its ref_logps were computed with {key}={block[key]}, this run has "
                    f"{value}: recompute them with the run's settings (python -m vargpt.preference.reference_logps)"
                )
        digest = digest or state_sha256(model)
        if block["sha256"] != digest:
            raise ValueError(
                f"data source {name} ({path}): its ref_logps were computed by the model {block['weights']} "
                f"(sha256 {block['sha256'][:12]}), not by this stage's starting weights (sha256 {digest[:12]}): "
                "recompute them from the start (python -m vargpt.preference.reference_logps --weights <start>) "
                "or set stage.preference.reference=frozen_copy"
            )


class PreferenceModule(VARGPTModule):
    """Trains a VARGPT on preference pairs with the loss of ``stage.preference``.

    Args:
        reference: the frozen starting model when ``stage.preference.reference`` is ``frozen_copy``; None when
            the batches carry precomputed ``ref_logps`` (or the loss needs no reference: orpo, simpo).
    """

    def __init__(
        self,
        model: nn.Module,
        stage: DictConfig,
        trainer_cfg: DictConfig,
        total_steps: int,
        seed: int,
        reference: nn.Module | None = None,
    ) -> None:
        super().__init__(model, stage, trainer_cfg, total_steps, seed)
        self.settings = preference_settings(stage)
        self.target = str(getattr(stage.preference.target, "value", stage.preference.target))
        self.metric_names = list(PREFERENCE_METRICS)
        self._sums = {split: torch.zeros(2, len(self.metric_names)) for split in ("train", "val")}
        self._seen = {split: [0] * len(self.metric_names) for split in ("train", "val")}
        # Kept out of the module tree: not trained, not in the checkpoint, not moved by Lightning (see on_fit_start).
        self.__dict__["reference"] = reference
        if reference is not None:
            reference.requires_grad_(False).eval()

    def configure_model(self) -> None:
        """As the VARGPT module; under FSDP2 the step calls ``sequence_logps``, not ``forward``, so it is registered
        as a forward method (the root's parameters are gathered around it as around ``forward``)."""
        first_call = not self._configured  # Lightning may call it again; the model is configured once
        super().configure_model()
        if first_call and isinstance(self.trainer.strategy, ModelParallelStrategy):
            register_fsdp_forward_method(self.model, "sequence_logps")

    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)

    def train(self, mode: bool = True) -> PreferenceModule:
        """As the VARGPT module, with drop-path off everywhere (see the module docstring)."""
        super().train(mode)
        for module in self.model.modules():
            if isinstance(module, DropPath):
                module.eval()
        return self

    def _reference_logps(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """The reference's (B, 2) summed log-probs: from the batch, from the frozen copy, or None (not needed)."""
        if not self.settings.uses_reference:
            return None
        if self.reference is not None:
            with torch.no_grad():
                return pair_logps(self.reference, batch, self.target)[0]
        ref = batch.get("ref_logps")
        if ref is None:
            raise ValueError(
                "stage.preference.reference=precomputed, but the batch has no ref_logps: precompute them with "
                "`python -m vargpt.preference.reference_logps` or set stage.preference.reference=frozen_copy"
            )
        return _as_pairs(ref, batch)

    def _forward(self, batch: dict[str, Any]) -> tuple[Any, torch.Tensor]:
        """The pair batch's preference loss; ``out.metrics`` holds the logged figures."""
        policy_B2, counts_B2 = pair_logps(self.model, batch, self.target)
        result = preference_loss(self.settings, policy_B2, counts_B2, self._reference_logps(batch))
        return SimpleNamespace(metrics=result.metrics), result.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        out, loss = self._forward(batch)
        self._accumulate("val", out.metrics, loss)
