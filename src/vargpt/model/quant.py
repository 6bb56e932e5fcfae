"""VAR's multi-scale residual vector quantiser (``VectorQuantizer2`` in VAR's ``models/quant.py``).

A feature map ``f`` (B, Cvae, P, P) is quantised scale by scale: at scale k the not-yet-explained residual is
area-downsampled to p_k x p_k, every position takes its nearest codebook entry (L2), the chosen embeddings are
bicubic-upsampled back to P x P and refined by a small conv phi_k, and the result is added to the running
reconstruction ``f_hat`` and subtracted from the residual (VARGPT-REFERENCE.md 1.7). Every path that turns codes
into features (encoding, decoding, VAR teacher forcing, incremental inference) goes through the same
:meth:`MultiScaleQuantizer.lift`, so they agree to the last bit. All of it runs in fp32 with autocast off, also
when the parameters are half precision (a model cast to bf16/fp16): the codebook and the phis are upcast where
they are used, so fp32 features never meet half weights and the codes are those of the (rounded) weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import distributed as tdist
from torch import nn

from vargpt.model.scales import ScaleSchedule


class Phi(nn.Conv2d):
    """phi(h) = (1 - r) * h + r * conv3x3(h), the residual refinement applied to each upsampled scale.

    VAR stores ``r = |quant_resi|``, so a negative ``quant_resi`` behaves like its absolute value.
    """

    def __init__(self, channels: int, quant_resi: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        # In the input's dtype, whatever the weights' (the quantiser's fp32 lifts meet a half model's phis).
        dtype = h_BCHW.dtype
        conv_BCHW = self._conv_forward(h_BCHW, self.weight.to(dtype), self.bias.to(dtype))
        return h_BCHW * (1 - self.resi_ratio) + conv_BCHW * self.resi_ratio


# Deviation from VAR: VAR's containers are indexed by the scale position in [0, 1] and do the tick routing
# themselves; ours are indexed by the phi index and the routing lives in ScaleSchedule.phi_index, the one place
# the VQ-VAE, the VAR decoder and VARGPT share. Parameter names are VAR's.


class PhiShared(nn.Module):
    """One phi for every scale (``share_quant_resi == 1``); key ``quant_resi.qresi``."""

    def __init__(self, qresi: nn.Module) -> None:
        super().__init__()
        self.qresi = qresi

    @property
    def num_phi(self) -> int:
        return 1

    def __getitem__(self, _: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """``n`` phis shared by neighbouring scales (``share_quant_resi == n > 1``); keys ``quant_resi.qresi_ls.{i}``."""

    def __init__(self, qresi_ls: nn.ModuleList) -> None:
        super().__init__()
        self.qresi_ls = qresi_ls

    @property
    def num_phi(self) -> int:
        return len(self.qresi_ls)

    def __getitem__(self, i: int) -> nn.Module:
        return self.qresi_ls[i]


class PhiNonShared(nn.ModuleList):
    """One phi per scale (``share_quant_resi == 0``); keys ``quant_resi.{k}``."""

    @property
    def num_phi(self) -> int:
        return len(self)


PhiContainer = PhiShared | PhiPartiallyShared | PhiNonShared


def build_phi(channels: int, quant_resi: float, share_quant_resi: int, num_scales: int) -> PhiContainer:
    """VAR's choice of phi container; ``|quant_resi| <= 1e-6`` makes every phi the identity (no parameters)."""

    def make() -> nn.Module:
        return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

    if share_quant_resi < 0:
        raise ValueError(f"share_quant_resi must be >= 0, got {share_quant_resi}")
    if share_quant_resi == 0:
        return PhiNonShared([make() for _ in range(num_scales)])
    if share_quant_resi == 1:
        return PhiShared(make())
    return PhiPartiallyShared(nn.ModuleList(make() for _ in range(share_quant_resi)))


def fp32_region(device: torch.device) -> AbstractContextManager:
    """Autocast off: codes must not depend on whether the caller runs under bf16 autocast (reference 9.8)."""
    return torch.autocast(device_type=device.type, enabled=False)


@dataclass
class QuantizerOutput:
    """What the training forward of the quantiser returns."""

    f_hat: torch.Tensor  # (B, Cvae, P, P), straight-through: the value of f_hat, the gradient of f
    vq_loss: torch.Tensor  # scalar
    codes: list[torch.Tensor]  # K LongTensors (B, p_k^2)
    usage: torch.Tensor  # scalar float: fraction of the codebook hit in this batch (all scales; all ranks in training)


class MultiScaleQuantizer(nn.Module):
    """Codebook ``embedding`` (V, Cvae), phis ``quant_resi`` and per-scale hit counts ``ema_vocab_hit_SV`` (K, V)."""

    def __init__(
        self,
        vocab_size: int,
        Cvae: int,
        schedule: ScaleSchedule,
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.Cvae = Cvae
        self.schedule = schedule
        self.beta = beta
        self.quant_resi = build_phi(Cvae, quant_resi, share_quant_resi, schedule.num_scales)
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(schedule.num_scales, vocab_size))
        # Training forwards seen so far; selects the EMA rate of the hit counts (not saved, as in VAR).
        self.record_hit = 0
        self.embedding = nn.Embedding(vocab_size, Cvae)

    @torch.no_grad()
    def eini(self, eini: float) -> None:
        """VAR's codebook init: ``eini > 0`` truncated normal of std ``eini``; ``< 0`` uniform +-|eini|/V; 0 keeps it.

        Training from scratch wants small rows (VAR's ``-1``): encoder features start near zero, and N(0, 1)
        rows (nn.Embedding's default) leave all but the few smallest codes unreachable.
        """
        w = self.embedding.weight
        if eini > 0:
            nn.init.trunc_normal_(w, std=eini)
        elif eini < 0:
            w.uniform_(-abs(eini) / self.vocab_size, abs(eini) / self.vocab_size)

    # ------------------------------------------------------------------ building blocks
    @property
    def max_side(self) -> int:
        return self.schedule.max_side

    def phi(self, k: int) -> nn.Module:
        return self.quant_resi[self.schedule.phi_index(k, self.quant_resi.num_phi)]

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Index of the L2-nearest codebook row of every row of ``z_NC``; no gradient.

        Same arithmetic as VAR (|z|^2 + |e|^2 - 2 z.e) so ties and near-ties break the same way.
        """
        z_NC = z_NC.detach().float()
        e_VC = self.embedding.weight.detach().float()  # a half model's codebook: still fp32 distances
        d_NV = z_NC.square().sum(1, keepdim=True) + e_VC.square().sum(1)
        d_NV.addmm_(z_NC, e_VC.T, alpha=-2, beta=1)
        return d_NV.argmin(dim=1)

    def embed(self, k: int, codes_Bl: torch.Tensor) -> torch.Tensor:
        """Codes of scale k (B, p_k^2), row-major, -> embeddings on the scale's grid (B, Cvae, p_k, p_k)."""
        p = self.schedule.patch_nums[k]
        B, l = codes_Bl.shape
        if l != p * p:
            raise ValueError(f"scale {k} has {p}x{p}={p * p} tokens, got {l}")
        e_BlC = F.embedding(codes_Bl, self.embedding.weight.float())  # fp32 rows even from a half codebook
        return e_BlC.transpose(1, 2).reshape(B, self.Cvae, p, p)

    def lift(self, k: int, codes_Bl: torch.Tensor) -> torch.Tensor:
        """The contribution of scale k to f_hat: phi_k(bicubic_up(embed(codes))), shape (B, Cvae, P, P).

        The last scale is already P x P and is not interpolated (as in VAR).
        """
        h_BCpp = self.embed(k, codes_Bl)
        if k != self.schedule.num_scales - 1:
            h_BCpp = F.interpolate(h_BCpp, size=(self.max_side, self.max_side), mode="bicubic")
        return self.phi(k)(h_BCpp)

    def _area(self, x_BCPP: torch.Tensor, p: int) -> torch.Tensor:
        return F.interpolate(x_BCPP, size=(p, p), mode="area")

    def _residual_scales(self, f_BCPP: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Greedy multi-scale residual quantisation: yields (z_k, codes_Bl, lift_k) for k = 0..K-1.

        ``z_k`` (B, C, p_k, p_k) is the residual scale k quantises. ``lift_k`` carries gradient to the codebook
        and the phis when grad mode is on; the residual does not.
        """
        B, C = f_BCPP.shape[:2]
        if tuple(f_BCPP.shape[2:]) != (self.max_side, self.max_side):
            raise ValueError(f"feature map must be {self.max_side}x{self.max_side}, got {tuple(f_BCPP.shape[2:])}")
        f_rest = f_BCPP.detach()
        last = self.schedule.num_scales - 1
        for k, p in enumerate(self.schedule.patch_nums):
            z_BCpp = f_rest if k == last else self._area(f_rest, p)
            codes_Bl = self.nearest_code(z_BCpp.permute(0, 2, 3, 1).reshape(-1, C)).view(B, p * p)
            h_BCPP = self.lift(k, codes_Bl)
            f_rest = f_rest - h_BCPP.detach()  # out of place: z_BCpp of the last scale is f_rest itself
            yield z_BCpp, codes_Bl, h_BCPP

    # ------------------------------------------------------------------ inference paths
    @torch.no_grad()
    def f_to_codes(self, f_BCPP: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Codes of every scale and the final f_hat (VAR ``f_to_idxBl_or_fhat``)."""
        with fp32_region(f_BCPP.device):
            codes: list[torch.Tensor] = []
            f_hat = torch.zeros_like(f_BCPP, dtype=torch.float32)
            for _, codes_Bl, h_BCPP in self._residual_scales(f_BCPP.float()):
                codes.append(codes_Bl)
                f_hat = f_hat + h_BCPP
            return codes, f_hat

    def codes_to_fhat(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Sum of every scale's lift: (B, Cvae, P, P) (VAR ``embed_to_fhat(all_to_max_scale=True)[-1]``)."""
        self._check_num_scales(codes)
        with fp32_region(codes[0].device):
            f_hat = self._zeros_fhat(codes[0].shape[0], codes[0].device)
            for k, codes_Bl in enumerate(codes):
                f_hat = f_hat + self.lift(k, codes_Bl)
            return f_hat

    def codes_to_var_input(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """VAR's teacher-forcing input (``idxBl_to_var_input``): (B, L - p_0^2, Cvae), fp32.

        The input of scale k+1 is the running f_hat after scales 0..k, area-downsampled to p_{k+1}, row-major.
        """
        self._check_num_scales(codes)
        with fp32_region(codes[0].device):
            B = codes[0].shape[0]
            f_hat = self._zeros_fhat(B, codes[0].device)
            inputs: list[torch.Tensor] = []
            for k in range(self.schedule.num_scales - 1):
                f_hat = f_hat + self.lift(k, codes[k])
                inputs.append(self._next_scale_input(k, f_hat))
            return torch.cat(inputs, dim=1) if inputs else f_hat.new_zeros(B, 0, self.Cvae)

    def next_input(
        self, k: int, f_hat_BCPP: torch.Tensor | None, codes_k_Bl: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One inference step (VAR ``get_next_autoregressive_input``): add scale k, give scale k+1's input.

        Returns the new f_hat (out of place: the caller's tensor is not modified, unlike VAR's ``add_``) and
        (B, p_{k+1}^2, Cvae), or None after the last scale. ``f_hat_BCPP=None`` starts from zeros (k = 0).
        """
        with fp32_region(codes_k_Bl.device):
            if f_hat_BCPP is None:
                f_hat_BCPP = self._zeros_fhat(codes_k_Bl.shape[0], codes_k_Bl.device)
            f_hat_BCPP = f_hat_BCPP.float() + self.lift(k, codes_k_Bl)
            nxt = None if k == self.schedule.num_scales - 1 else self._next_scale_input(k, f_hat_BCPP)
            return f_hat_BCPP, nxt

    def _next_scale_input(self, k: int, f_hat_BCPP: torch.Tensor) -> torch.Tensor:
        p = self.schedule.patch_nums[k + 1]
        return self._area(f_hat_BCPP, p).flatten(2).transpose(1, 2)

    def _zeros_fhat(self, B: int, device: torch.device) -> torch.Tensor:
        return torch.zeros(B, self.Cvae, self.max_side, self.max_side, device=device, dtype=torch.float32)

    def _check_num_scales(self, codes: list[torch.Tensor]) -> None:
        if len(codes) != self.schedule.num_scales:
            raise ValueError(f"expected codes of {self.schedule.num_scales} scales, got {len(codes)}")

    # ------------------------------------------------------------------ training
    def forward(self, f_BCPP: torch.Tensor) -> QuantizerOutput:
        """Training forward (VAR ``VectorQuantizer2.forward``).

        vq_loss = mean over scales k of  beta * mse(f_hat_k.detach(), f) + mse(f_hat_k, f.detach()),  with
        f_hat_k the running reconstruction after scale k: the first term is the commitment loss (gradient to the
        encoder), the second the codebook loss (gradient to the codebook and the phis). The returned f_hat is
        straight-through so the decoder's gradient reaches the encoder.
        """
        with fp32_region(f_BCPP.device):
            f = f_BCPP.float()
            f_no_grad = f.detach()
            f_hat = torch.zeros_like(f_no_grad)
            vq_loss = f.new_zeros(())
            codes: list[torch.Tensor] = []
            hit_SV = f.new_zeros(self.schedule.num_scales, self.vocab_size)
            for k, (_, codes_Bl, h_BCPP) in enumerate(self._residual_scales(f)):
                codes.append(codes_Bl)
                hit_SV[k] = codes_Bl.flatten().bincount(minlength=self.vocab_size).float()
                f_hat = f_hat + h_BCPP
                vq_loss = vq_loss + self.beta * F.mse_loss(f_hat.detach(), f) + F.mse_loss(f_hat, f_no_grad)
            vq_loss = vq_loss / self.schedule.num_scales
            f_hat_st = (f_hat.detach() - f_no_grad) + f
        if self.training:
            # Only in training, as in VAR: an eval forward may run on one rank alone (e.g. logging images).
            if tdist.is_available() and tdist.is_initialized():
                tdist.all_reduce(hit_SV)
            self._record_hits(hit_SV)
        usage = (hit_SV.sum(0) > 0).float().mean()
        return QuantizerOutput(f_hat=f_hat_st, vq_loss=vq_loss, codes=codes, usage=usage)

    @torch.no_grad()
    def _record_hits(self, hit_SV: torch.Tensor) -> None:
        # VAR's schedule: copy on the first step, EMA 0.9 for the next 99, then 0.99. Deviation: VAR updates only
        # when torch.distributed is initialised and counts steps per scale; we update in single-process runs too
        # and count training forwards, so every scale's first record is a copy.
        if self.record_hit == 0:
            self.ema_vocab_hit_SV.copy_(hit_SV)
        else:
            decay = 0.9 if self.record_hit < 100 else 0.99
            self.ema_vocab_hit_SV.mul_(decay).add_(hit_SV, alpha=1 - decay)
        self.record_hit += 1

    @torch.no_grad()
    def residual_samples(
        self, f_BCPP: torch.Tensor, per_scale: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``per_scale`` random rows of the residual every scale quantises: (K * per_scale, Cvae).

        What dead codes should be revived from: every scale looks codes up against its own residual (large at
        the coarse scales, small at the fine ones), so raw features ``f`` would revive codes only the first
        scales can reach.
        """
        rows: list[torch.Tensor] = []
        with fp32_region(f_BCPP.device):
            for z_BCpp, _, _ in self._residual_scales(f_BCPP.float()):
                z_NC = z_BCpp.permute(0, 2, 3, 1).reshape(-1, self.Cvae)
                rows.append(z_NC[torch.randint(len(z_NC), (per_scale,), generator=generator, device=z_NC.device)])
        return torch.cat(rows)

    @torch.no_grad()
    def revive_dead_codes(
        self, f_samples_NC: torch.Tensor, min_usage: float = 0.08, generator: torch.Generator | None = None
    ) -> int:
        """Re-initialise dead codebook rows from encoder features; returns how many rows were reset.

        Rule: a code is dead when its EMA hit count summed over scales (``ema_vocab_hit_SV.sum(0)``) is below
        ``min_usage`` times the mean over the codebook, i.e. it is used less than ``min_usage`` of a uniform share
        (0.08 mirrors the 8 % margin of VAR's usage metric). Nothing is reset before any hit was recorded. Each
        dead row is replaced by a distinct random row of ``f_samples_NC`` (N, Cvae), e.g. features
        ``quant_conv(encoder(x))`` flattened, or ``area``-downsampled ones for the coarse scales; rows are drawn
        with replacement only when N is smaller than the number of dead codes. A revived code's hit counts are
        set to the per-scale mean so it gets time to be picked before it can be judged dead again. Under
        torch.distributed the result of rank 0 is broadcast. Optimizer moments of the reset rows are left as
        they are (reset them in the caller if it matters).
        """
        hits_V = self.ema_vocab_hit_SV.sum(0)
        mean_hits = hits_V.mean()
        if mean_hits <= 0:
            return 0
        dead_V = hits_V < min_usage * mean_hits
        n_dead = int(dead_V.sum())
        if n_dead > 0:
            num_samples = f_samples_NC.shape[0]
            if num_samples == 0:
                raise ValueError("f_samples_NC is empty")
            device = f_samples_NC.device
            if num_samples >= n_dead:
                pick = torch.randperm(num_samples, generator=generator, device=device)[:n_dead]
            else:
                pick = torch.randint(num_samples, (n_dead,), generator=generator, device=device)
            weight = self.embedding.weight
            weight[dead_V] = f_samples_NC[pick].to(device=weight.device, dtype=weight.dtype)
            self.ema_vocab_hit_SV[:, dead_V] = self.ema_vocab_hit_SV.mean(1, keepdim=True)
            # Hit counts are all-reduced, so every rank finds the same n_dead and joins these broadcasts.
            if tdist.is_available() and tdist.is_initialized():
                tdist.broadcast(weight.data, src=0)
                tdist.broadcast(self.ema_vocab_hit_SV, src=0)
        return n_dead

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # VAR's VQVAE.load_state_dict keeps its own hit counts when the checkpoint's have another shape (another
        # patch_nums). Doing it here instead of in VQVAE.load_state_dict also covers a VQ-VAE nested in VARGPT.
        key = prefix + "ema_vocab_hit_SV"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.ema_vocab_hit_SV.shape):
            state_dict[key] = self.ema_vocab_hit_SV
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
