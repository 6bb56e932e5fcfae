"""VAR's multi-scale VQ-VAE: the image tokenizer and detokenizer of VARGPT's generation branch.

An image in [-1, 1] becomes K token maps of sides ``patch_nums`` (680 tokens at 256 px) and back. The module
layout is VAR's ``models/vqvae.py``, so ``load_state_dict(strict=True)`` accepts ``vae_ch160v4096z32.pth``
unchanged (VARGPT-REFERENCE.md 1.7, 7.3). Besides encoding and decoding it provides the two feature paths of the
VAR decoder: the one-shot teacher-forcing input (training, 2.2) and the step-by-step ``next_input`` (inference,
2.3), which agree exactly. ``forward`` is the training forward for training a VQ-VAE from scratch.

Deviations from VAR: the module is built trainable and in train mode (VAR's ``test_mode`` froze it; freezing is
the trainer's job here); encoding, teacher forcing and ``next_input`` always run in fp32 with autocast off (VARGPT
ran them in bf16, reference 9.8); only L2 code lookup (VAR's ``using_znorm=False``, the released setting).

Quick use::

    vq = build_vqvae()                      # the released shapes; load vae_ch160v4096z32.pth into it
    codes = vq.img_to_codes(img_B3HW)       # 10 LongTensors (B, p*p)
    img = vq.codes_to_img(codes)            # (B, 3, 256, 256) in [-1, 1]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vargpt.model.config import VQVAEConfig
from vargpt.model.quant import MultiScaleQuantizer, fp32_region
from vargpt.model.scales import VAR_PATCH_NUMS, ScaleSchedule
from vargpt.model.vqvae_blocks import Decoder, Encoder


@dataclass(frozen=True)
class DecodeOptions:
    """The fast paths of decoding (``fhat_to_img`` / ``codes_to_img``: generation, evaluation); the training
    forward always runs the plain decoder. The defaults stay within fp32 rounding of the plain path.

    Args:
        channels_last: run the decoder on a channels-last (NHWC) input: oneDNN's convolutions, GroupNorm and
            the element-wise ops take it without the NCHW reorders (same values up to fp32 rounding).
        phase_upsample: every nearest-2x upsample + 3x3 conv as four 2x2 convs on the low-resolution map
            (``vqvae_blocks.upsample_conv_phases``: 4/9 of its multiply-accumulates, same values up to rounding).
        bf16: bf16 autocast over the decoder. Not within 1/255 of fp32 (docs/performance.md has the measured
            difference), so off by default; faster on CPUs with AVX512-BF16/AMX and on GPUs.
        compile: ``torch.compile`` the decoder (one graph per input shape; the first call of a shape compiles).
    """

    channels_last: bool = True
    phase_upsample: bool = True
    bf16: bool = False
    compile: bool = False

    @classmethod
    def plain(cls) -> DecodeOptions:
        """Every fast path off: the decoder as it was before them (the reference of tests and benchmarks)."""
        return cls(channels_last=False, phase_upsample=False, bf16=False, compile=False)


@dataclass
class VQVAEOutput:
    """Training forward of the VQ-VAE."""

    recon: torch.Tensor  # (B, 3, H, W), not clamped (the reconstruction loss sees the raw decoder output)
    vq_loss: torch.Tensor  # scalar: commitment + codebook loss, mean over scales
    codes: list[torch.Tensor]  # K LongTensors (B, p_k^2)
    usage: torch.Tensor  # scalar float: fraction of codebook entries hit in this batch


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantiser -> post_quant_conv -> decoder (VAR's attribute names)."""

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        beta: float = 0.25,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        patch_nums: tuple[int, ...] = VAR_PATCH_NUMS,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        in_channels: int = 3,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.schedule = ScaleSchedule(tuple(patch_nums))
        self.V, self.Cvae = vocab_size, z_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        net = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            dropout=dropout,
            in_channels=in_channels,
            z_channels=z_channels,
            using_sa=using_sa,
            using_mid_sa=using_mid_sa,
            norm_groups=norm_groups,
        )
        self.encoder = Encoder(**net)
        self.decoder = Decoder(**net)
        self.quantize = MultiScaleQuantizer(
            vocab_size, z_channels, self.schedule, beta=beta, quant_resi=quant_resi, share_quant_resi=share_quant_resi
        )
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self._compiled_decode: Callable[[torch.Tensor, bool], torch.Tensor] | None = None  # DecodeOptions.compile

    @property
    def codebook(self) -> torch.Tensor:
        """The code embeddings (V, Cvae)."""
        return self.quantize.embedding.weight

    @property
    def image_size(self) -> int:
        """Side of the images the schedule is made for (256 for VAR's)."""
        return self.schedule.max_side * self.downsample

    # ------------------------------------------------------------------ encoding
    def img_to_f(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Continuous latent before quantisation, ``quant_conv(encoder(img))``: (B, Cvae, P, P)."""
        side = self.image_size
        if img_B3HW.shape[-2:] != (side, side):
            raise ValueError(f"this VQ-VAE encodes {side}x{side} images, got {tuple(img_B3HW.shape[-2:])}")
        return self.quant_conv(self.encoder(img_B3HW))

    @torch.no_grad()
    def img_to_codes(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Image in [-1, 1] -> K LongTensors (B, p_k^2), row-major per scale; fp32 even under autocast."""
        with fp32_region(img_B3HW.device):
            f_BCPP = self.img_to_f(img_B3HW.to(self.codebook.dtype))
            codes, _ = self.quantize.f_to_codes(f_BCPP)
        return codes

    # ------------------------------------------------------------------ decoding
    def codes_to_fhat(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """K code maps -> the summed latent f_hat (B, Cvae, P, P), fp32."""
        return self.quantize.codes_to_fhat(codes)

    def fhat_to_img(self, f_hat_BCPP: torch.Tensor, options: DecodeOptions | None = None) -> torch.Tensor:
        """Latent -> image (B, 3, H, W) clamped to [-1, 1], through the fast paths of ``options`` (None: the
        defaults of :class:`DecodeOptions`). Runs under the caller's autocast unless ``options.bf16``."""
        opts = DecodeOptions() if options is None else options
        if opts.channels_last:
            f_hat_BCPP = f_hat_BCPP.contiguous(memory_format=torch.channels_last)
        decode = self._decode
        if opts.compile:
            if self._compiled_decode is None:
                self._compiled_decode = torch.compile(self._decode, dynamic=False)
            decode = self._compiled_decode
        amp = torch.autocast(f_hat_BCPP.device.type, dtype=torch.bfloat16) if opts.bf16 else contextlib.nullcontext()
        with amp:
            return decode(f_hat_BCPP, opts.phase_upsample).contiguous()

    def _decode(self, f_hat_BCPP: torch.Tensor, phase_upsample: bool) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat_BCPP), phase_upsample).clamp(-1, 1)

    def codes_to_img(self, codes: list[torch.Tensor], options: DecodeOptions | None = None) -> torch.Tensor:
        """K code maps -> image (B, 3, H, W) in [-1, 1] (:meth:`fhat_to_img` with ``options``)."""
        return self.fhat_to_img(self.codes_to_fhat(codes), options)

    # ------------------------------------------------------------------ the VAR decoder's inputs
    def codes_to_teacher_input(self, codes: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of scales 1..K-1: (B, L - p_0^2, Cvae), fp32 (VAR ``idxBl_to_var_input``)."""
        return self.quantize.codes_to_var_input(codes)

    def next_input(
        self, k: int, f_hat_BCPP: torch.Tensor | None, codes_k_Bl: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference step k: f_hat += phi_k(up(embed(codes_k))); returns (f_hat, input of scale k+1 or None).

        Pass ``f_hat_BCPP=None`` at k = 0. The next input is (B, p_{k+1}^2, Cvae), the area-downsampled f_hat.
        """
        return self.quantize.next_input(k, f_hat_BCPP, codes_k_Bl)

    # ------------------------------------------------------------------ training
    def forward(self, img_B3HW: torch.Tensor) -> VQVAEOutput:
        """Training forward: reconstruction through the straight-through quantiser, VQ loss, codes, usage.

        Hit counts for :meth:`revive_dead_codes` are recorded in train mode only.
        """
        q = self.quantize(self.img_to_f(img_B3HW))
        recon = self.decoder(self.post_quant_conv(q.f_hat))
        return VQVAEOutput(recon=recon, vq_loss=q.vq_loss, codes=q.codes, usage=q.usage)

    def revive_dead_codes(
        self, f_samples_NC: torch.Tensor, min_usage: float = 0.08, generator: torch.Generator | None = None
    ) -> int:
        """Reset codes used less than ``min_usage`` x the mean (EMA hits over all scales) to encoder features.

        See :meth:`MultiScaleQuantizer.revive_dead_codes` for the exact rule. ``f_samples_NC`` (N, Cvae), e.g.
        ``vq.img_to_f(x).permute(0, 2, 3, 1).reshape(-1, vq.Cvae)``. Returns how many codes were reset.
        """
        return self.quantize.revive_dead_codes(f_samples_NC, min_usage=min_usage, generator=generator)


def build_vqvae(
    vocab_size: int = 4096,
    z_channels: int = 32,
    ch: int = 160,
    share_quant_resi: int = 4,
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS,
    **kwargs,
) -> VQVAE:
    """The VQ-VAE with the released ``vae_ch160v4096z32`` shapes by default (108,948,355 parameters)."""
    return VQVAE(
        vocab_size=vocab_size,
        z_channels=z_channels,
        ch=ch,
        share_quant_resi=share_quant_resi,
        patch_nums=patch_nums,
        **kwargs,
    )


def vqvae_from_config(v: VQVAEConfig) -> VQVAE:
    """The VQ-VAE a ``model.vqvae`` config describes (every size, the tiny one and VAR's)."""
    return VQVAE(
        vocab_size=v.vocab_size,
        z_channels=v.z_channels,
        ch=v.ch,
        ch_mult=tuple(v.ch_mult),
        num_res_blocks=v.num_res_blocks,
        beta=v.beta,
        quant_resi=v.quant_resi,
        share_quant_resi=v.share_quant_resi,
        patch_nums=tuple(v.patch_nums),
        using_sa=v.using_sa,
        using_mid_sa=v.using_mid_sa,
        norm_groups=v.norm_groups,
    )
