"""Convolutional encoder and decoder of VAR's VQ-VAE (the latent-diffusion "vq-f16" architecture).

Module and attribute names follow VAR's ``models/basic_vae.py`` exactly (``down.{i}.block.{j}``, ``mid.attn_1``,
``up.{i}.upsample.conv``, ``norm_out``, ...), so the state dict of :class:`Encoder` / :class:`Decoder` is key for
key that of the released ``vae_ch160v4096z32.pth`` (VARGPT-REFERENCE.md 1.7, 7.3). All norms are GroupNorm with
``norm_groups`` groups: 32 in VAR and every released checkpoint; tiny CPU-sized models may use fewer so that their
channel counts can go below 32 (conv cost at full resolution grows with the square of the width).

The decoder's ``forward`` takes ``phase_upsample``: the nearest-2x upsample and its 3x3 conv computed as four 2x2
convolutions on the low-resolution map (:func:`upsample_conv_phases`), 4/9 of the multiply-accumulates and no
upsampled copy; equal to the plain path up to fp32 rounding (the inference fast path, ``VQVAE.fhat_to_img``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """VAR's ``Normalize``: GroupNorm with 32 groups (``groups`` for tiny models), eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


# Which rows of a 3x3 kernel each tap of a 2x2 phase kernel sums, for output phase a (0: even, 1: odd rows):
# an even output row 2i sees input rows i-1 (kernel row 0) and i (rows 1 + 2) of the nearest-2x map; an odd one
# 2i+1 sees rows i (kernel rows 0 + 1) and i+1 (row 2). Same for columns.
_PHASE_TAPS_ATK = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])


def upsample_conv_phases(x_BCHW: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(nearest_2x(x))`` for a 3x3, padding-1 ``conv``, as one 2x2 conv per output phase on ``x`` itself.

    Each of the four phases (even/odd row, even/odd column) of the upsampled output reads only 2x2 input pixels,
    with the 3x3 kernel's taps summed as :data:`_PHASE_TAPS_ATK` says; each phase is written into its strided
    slice of the output, which keeps ``x``'s memory format. Equal to the plain path up to fp32 rounding (the taps
    are added before, not after, the products).
    """
    B, _, H, W = x_BCHW.shape
    w_OCkk = conv.weight
    taps = _PHASE_TAPS_ATK.to(w_OCkk)
    w_abOCyx = torch.einsum("ayk,bxl,ockl->abocyx", taps, taps, w_OCkk)
    x_pad = F.pad(x_BCHW, (1, 1, 1, 1))
    channels_last = x_BCHW.is_contiguous(memory_format=torch.channels_last) and not x_BCHW.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    y_BO2H2W = torch.empty(
        (B, w_OCkk.shape[0], 2 * H, 2 * W), dtype=x_BCHW.dtype, device=x_BCHW.device, memory_format=fmt
    )
    for a in (0, 1):
        for b in (0, 1):
            y_BO2H2W[..., a::2, b::2] = F.conv2d(x_pad[..., a : a + H + 1, b : b + W + 1], w_abOCyx[a, b], conv.bias)
    return y_BO2H2W


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv (VAR's ``Upsample2x``); ``phases`` computes it as
    :func:`upsample_conv_phases` does."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BCHW: torch.Tensor, phases: bool = False) -> torch.Tensor:
        if phases:
            return upsample_conv_phases(x_BCHW, self.conv)
        return self.conv(F.interpolate(x_BCHW, scale_factor=2, mode="nearest"))


class Downsample(nn.Module):
    """Asymmetric zero pad (right, bottom) then a stride-2 3x3 conv (VAR's ``Downsample2x``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        # Padding only right/bottom keeps an even side exactly halved, like the checkpoint was trained with.
        return self.conv(F.pad(x_BCHW, pad=(0, 1, 0, 1), mode="constant", value=0.0))


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GN, swish, conv3x3) x 2, with a 1x1 ``nin_shortcut`` when channels change."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.nin_shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        # In-place swish is safe here: GroupNorm's backward needs its input, not its output.
        h = self.conv1(F.silu(self.norm1(x_BCHW), inplace=True))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=True)))
        return self.nin_shortcut(x_BCHW) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv ``qkv`` (3C) and ``proj_out``, scale C^-0.5, residual."""

    def __init__(self, channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        qkv_B3CL = self.qkv(self.norm(x_BCHW)).reshape(B, 3, C, H * W)
        # (B, 1 head, HW, C); SDPA's default scale 1/sqrt(C) is VAR's w_ratio.
        q, k, v = qkv_B3CL.transpose(2, 3).unsqueeze(2).unbind(1)
        h_B1LC = F.scaled_dot_product_attention(q, k, v)
        h_BCHW = h_B1LC.squeeze(1).transpose(1, 2).reshape(B, C, H, W)
        return x_BCHW + self.proj_out(h_BCHW)


def make_attn(channels: int, enabled: bool, norm_groups: int = 32) -> nn.Module:
    return AttnBlock(channels, norm_groups) if enabled else nn.Identity()


class MidBlock(nn.Module):
    """The lowest-resolution middle: ``block_1``, ``attn_1`` (Identity when mid attention is off), ``block_2``."""

    def __init__(self, channels: int, dropout: float, using_mid_sa: bool, norm_groups: int = 32) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = make_attn(channels, using_mid_sa, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x_BCHW)))


class _Level(nn.Module):
    """The ResNet ``block`` list of one resolution level, with one ``attn`` per block when attention is on."""

    def __init__(
        self, in_ch: int, out_ch: int, num_blocks: int, dropout: float, with_attn: bool, norm_groups: int
    ) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_ch if j == 0 else out_ch, out_ch, dropout, norm_groups) for j in range(num_blocks)
        )
        attn = (AttnBlock(out_ch, norm_groups) for _ in range(num_blocks))
        self.attn = nn.ModuleList(attn) if with_attn else nn.ModuleList()

    def run_blocks(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = x_BCHW
        for j, block in enumerate(self.block):
            h = block(h)
            if len(self.attn) > 0:
                h = self.attn[j](h)
        return h


class DownLevel(_Level):
    """An encoder level; every level but the lowest-resolution one ends with ``downsample``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_blocks: int,
        dropout: float,
        with_attn: bool,
        with_downsample: bool,
        norm_groups: int = 32,
    ) -> None:
        super().__init__(in_ch, out_ch, num_blocks, dropout, with_attn, norm_groups)
        self.downsample = Downsample(out_ch) if with_downsample else None

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.run_blocks(x_BCHW)
        return h if self.downsample is None else self.downsample(h)


class UpLevel(_Level):
    """A decoder level; every level but the full-resolution one (index 0) ends with ``upsample``."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        num_blocks: int,
        dropout: float,
        with_attn: bool,
        with_upsample: bool,
        norm_groups: int = 32,
    ) -> None:
        super().__init__(in_ch, out_ch, num_blocks, dropout, with_attn, norm_groups)
        self.upsample = Upsample(out_ch) if with_upsample else None

    def forward(self, x_BCHW: torch.Tensor, phase_upsample: bool = False) -> torch.Tensor:
        h = self.run_blocks(x_BCHW)
        return h if self.upsample is None else self.upsample(h, phase_upsample)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H/2^(n-1), W/2^(n-1)) for ``n = len(ch_mult)``."""

    def __init__(
        self,
        *,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_mults = (1, *ch_mult)
        self.down = nn.ModuleList()
        for i in range(n):
            last = i == n - 1
            block_out = ch * ch_mult[i]
            # Attention only at the lowest resolution, as in VAR.
            with_attn = last and using_sa
            self.down.append(
                DownLevel(ch * in_mults[i], block_out, num_res_blocks, dropout, with_attn, not last, norm_groups)
            )
        c_low = ch * ch_mult[-1]
        self.mid = MidBlock(c_low, dropout, using_mid_sa, norm_groups)
        self.norm_out = group_norm(c_low, norm_groups)
        self.conv_out = nn.Conv2d(c_low, z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BCHW)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, in_channels, h*2^(n-1), w*2^(n-1)).

    As in VAR, ``up`` is indexed by resolution level, not by execution order: ``up[n-1]`` is the lowest resolution
    and runs first. Each level has ``num_res_blocks + 1`` ResNet blocks.
    """

    def __init__(
        self,
        *,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        in_channels: int = 3,
        z_channels: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        n = len(ch_mult)
        c_low = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c_low, kernel_size=3, stride=1, padding=1)
        self.mid = MidBlock(c_low, dropout, using_mid_sa, norm_groups)
        levels: list[UpLevel] = []
        block_in = c_low
        for i in reversed(range(n)):
            block_out = ch * ch_mult[i]
            with_attn = i == n - 1 and using_sa
            levels.insert(0, UpLevel(block_in, block_out, num_res_blocks + 1, dropout, with_attn, i != 0, norm_groups))
            block_in = block_out
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z_BCHW: torch.Tensor, phase_upsample: bool = False) -> torch.Tensor:
        """``phase_upsample``: every upsample as :func:`upsample_conv_phases` (inference's fast path)."""
        h = self.mid(self.conv_in(z_BCHW))
        for level in reversed(self.up):
            h = level(h, phase_upsample)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))
