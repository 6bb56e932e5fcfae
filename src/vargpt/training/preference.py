"""Preference losses on chosen / rejected log-probabilities: VARGPT-v1.1's DPO stage.

The release trains its preference stage inside a LLaMA-Factory fork, whose ``CustomDPOTrainer`` wraps TRL's DPO
loss; this is the same arithmetic on the summed log-probabilities that :meth:`VARGPT.sequence_logps` returns (the
VQ codes at the generation slots, or the reply's text tokens). Written here because it is a few lines of tensor
arithmetic over our own log-probabilities; TRL's trainer would bring its own training loop.

* ``sigmoid`` (DPO): ``-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))``, with label smoothing ``s``:
  ``-(1 - s) log sigmoid(beta z) - s log sigmoid(-beta z)``;
* ``ipo``: ``(z - 1 / (2 beta))^2`` on length-averaged log-probabilities;
* ``orpo`` (no reference): ``-pi_c + beta * -log sigmoid(log odds(pi_c) - log odds(pi_r))``, length-averaged,
  where ``log odds(p) = p - log(1 - exp(p))``;
* ``simpo`` (no reference): ``-log sigmoid(beta * (pi_c - pi_r) - gamma)``, length-averaged.

Rewards: ``beta * (pi - ref)`` with a reference, ``beta * pi`` without (LLaMA-Factory's). The SFT term ``ftx`` adds
``ftx * -(pi_c / n_c)``: the chosen reply's length-averaged negative log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The losses that compare with a reference model, and those that use length-averaged log-probabilities.
WITH_REFERENCE = ("sigmoid", "ipo")
LENGTH_AVERAGED = ("ipo", "orpo", "simpo")
LOSS_TYPES = ("sigmoid", "ipo", "orpo", "simpo")
# The step metrics of a preference stage, in a fixed order (every rank reduces the same vector).
PREFERENCE_METRICS = (
    "loss",
    "loss_preference",
    "sft_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class PreferenceSettings:
    """The loss's settings (``stage.preference``)."""

    loss_type: str = "sigmoid"
    beta: float = 0.1
    ftx: float = 0.0
    simpo_gamma: float = 0.5
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"stage.preference.loss_type={self.loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")

    @property
    def uses_reference(self) -> bool:
        return self.loss_type in WITH_REFERENCE

    @property
    def length_averaged(self) -> bool:
        return self.loss_type in LENGTH_AVERAGED


@dataclass
class PreferenceLoss:
    """The mean loss over the pairs and its logged figures (detached)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def preference_loss(
    settings: PreferenceSettings,
    policy_B2: torch.Tensor,
    counts_B2: torch.Tensor,
    reference_B2: torch.Tensor | None,
) -> PreferenceLoss:
    """The preference loss of B pairs.

    Args:
        settings: the loss and its constants.
        policy_B2: the policy's summed log-probabilities, column 0 the chosen reply, column 1 the rejected one.
        counts_B2: how many positions each sum covers (the length average divides by it).
        reference_B2: the reference model's summed log-probabilities, same layout (None for orpo / simpo).
    """
    if settings.uses_reference and reference_B2 is None:
        raise ValueError(f"loss_type={settings.loss_type} compares with a reference model: no reference log-probs")
    counts_B2 = counts_B2.to(policy_B2.dtype).clamp_min(1)
    policy = policy_B2 / counts_B2 if settings.length_averaged else policy_B2
    beta = settings.beta
    if settings.uses_reference:
        reference = reference_B2.to(policy.dtype)
        reference = reference / counts_B2 if settings.length_averaged else reference
        z_B = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
        if settings.loss_type == "sigmoid":
            s = settings.label_smoothing
            losses_B = -(1 - s) * F.logsigmoid(beta * z_B) - s * F.logsigmoid(-beta * z_B)
        else:  # ipo
            losses_B = (z_B - 1 / (2 * beta)) ** 2
        rewards_B2 = beta * (policy - reference).detach()
    else:
        if settings.loss_type == "orpo":
            log_odds_B = (policy[:, 0] - policy[:, 1]) - (
                torch.log1p(-torch.exp(policy[:, 0])) - torch.log1p(-torch.exp(policy[:, 1]))
            )
            losses_B = -policy[:, 0] - beta * F.logsigmoid(log_odds_B)
        else:  # simpo
            losses_B = -F.logsigmoid(beta * (policy[:, 0] - policy[:, 1]) - settings.simpo_gamma)
        rewards_B2 = beta * policy.detach()
    sft_B = -policy_B2[:, 0] / counts_B2[:, 0]
    loss_preference = losses_B.mean()
    loss = loss_preference + settings.ftx * sft_B.mean() if settings.ftx > 0 else loss_preference
    metrics = {
        "loss_preference": loss_preference.detach(),
        "sft_loss": sft_B.mean().detach(),
        "rewards/chosen": rewards_B2[:, 0].mean(),
        "rewards/rejected": rewards_B2[:, 1].mean(),
        "rewards/accuracies": (rewards_B2[:, 0] > rewards_B2[:, 1]).float().mean(),
        "rewards/margins": (rewards_B2[:, 0] - rewards_B2[:, 1]).mean(),
        "logps/chosen": policy[:, 0].detach().mean(),
        "logps/rejected": policy[:, 1].detach().mean(),
    }
    return PreferenceLoss(loss, metrics)
