"""VAR, the next-scale-prediction transformer that VARGPT uses as its visual decoder.

A re-statement of FoundationVision/VAR ``models/var.py`` (VARGPT-REFERENCE.md 1.5, 2.2-2.4, 7.2) whose
``state_dict`` is key-for-key and shape-for-shape the released ``var_d16.pth`` .. ``var_d30.pth`` (buffers
``lvl_1L``, ``attn_bias_for_masking`` and ``blocks.N.attn.zero_k_bias`` included). VAR's monolithic forward
and sampler are split into the pieces VARGPT needs separately: ``cond`` / ``embed_*`` build the token
stream, ``decode`` runs blocks and head on any stream (VAR's own embeddings, or LLM hidden states projected
back to VAR's width), ``sample`` is VAR's class-conditional ``autoregressive_infer_cfg``.

The VQ-VAE is not a sub-module (as in VAR, which holds it in a tuple): its weights are a separate checkpoint.
Deviations from VAR are noted where they happen; the main ones: no label dropout in eval mode, an explicit
KV cache, ``sample`` returns codes instead of an image, and the head always runs in the weights' dtype with
autocast off (VAR ran its head matmul in the autocast dtype).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from vargpt.model.config import ModelConfig
from vargpt.model.sampling import cfg_ratio
from vargpt.model.scale_step import NextInputVQVAE, ScaleSampler, ScaleStepOptions
from vargpt.model.scales import VAR_PATCH_NUMS, ScaleSchedule
from vargpt.model.var_blocks import AdaLNBeforeHead, AdaLNSelfAttn, VARKVCache


def _autocast_off(device: torch.device) -> AbstractContextManager:
    return torch.autocast(device_type=device.type, enabled=False)


@dataclass
class AdaLNConditions:
    """The AdaLN modulations of one condition: per block ada_B16C (``AdaLNSelfAttn.modulation``) and the head's
    ada_B12C. A generation computes them once (:meth:`VAR.adaln_conditions`) and reuses them at every scale."""

    blocks: list[torch.Tensor]
    head: torch.Tensor


class VAR(nn.Module):
    """Class-conditional next-scale-prediction transformer (VAR-dN: width 64N, N heads, N AdaLN blocks)."""

    def __init__(
        self,
        depth: int,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        num_classes: int = 1000,
        vocab_size: int = 4096,
        z_channels: int = 32,
        patch_nums: Sequence[int] = VAR_PATCH_NUMS,
        mlp_ratio: float = 4.0,
        drop_path_rate: float | None = None,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = True,
        cond_drop_rate: float = 0.1,
        vqvae: NextInputVQVAE | None = None,
    ) -> None:
        super().__init__()
        embed_dim = depth * 64 if embed_dim is None else embed_dim
        num_heads = depth if num_heads is None else num_heads
        drop_path_rate = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.Cvae, self.V = z_channels, vocab_size
        self.num_classes = num_classes
        self.null_class = num_classes  # the extra last row of class_emb: the unconditional "class"
        self.cond_drop_rate = cond_drop_rate
        self.drop_path_rate = drop_path_rate
        self.schedule = ScaleSchedule(tuple(patch_nums))
        self.L = self.schedule.num_tokens
        self.first_l = self.schedule.tokens_per_scale[0]

        # Inputs: VQ-VAE features of the previous scales, class token at position 0, absolute and level
        # position embeddings. Initialised here as VAR does (init_weights redoes Linear/Embedding only).
        init_std = math.sqrt(1 / self.C / 3)
        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.class_emb = nn.Embedding(num_classes + 1, self.C)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        self.lvl_embed = nn.Embedding(self.schedule.num_scales, self.C)
        for w in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(w.data, mean=0.0, std=init_std)

        # Stochastic depth grows linearly over the blocks, 0 -> drop_path_rate (computed in Python, not with
        # torch.linspace as VAR, so the model can be built on the meta device).
        dpr = [drop_path_rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0]
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(
                block_idx=i,
                embed_dim=self.C,
                cond_dim=self.D,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                drop_path=dpr[i],
                norm_eps=norm_eps,
                attn_l2_norm=attn_l2_norm,
            )
            for i in range(depth)
        )
        # Persistent, like VAR, so released checkpoints load strictly.
        self.register_buffer("lvl_1L", self.schedule.level_ids())
        self.register_buffer("attn_bias_for_masking", self.schedule.block_causal_bias().contiguous())

        self.head_nm = AdaLNBeforeHead(self.C, self.D, norm_eps=norm_eps)
        self.head = nn.Linear(self.C, self.V)

        self._vqvae_proxy: tuple[NextInputVQVAE, ...] = ()
        # Preallocated KV caches kept across generations (new_kv_cache(reuse=True)), by rows, dtype and device.
        self._kv_pool: dict[tuple[int, torch.dtype, torch.device], VARKVCache] = {}
        if vqvae is not None:
            self.bind_vqvae(vqvae)

    # ------------------------------------------------------------------ VQ-VAE reference
    def bind_vqvae(self, vqvae: NextInputVQVAE) -> None:
        """Remember the VQ-VAE for ``sample``. Held in a tuple (VAR's ``vae_proxy`` trick) so that it is not a
        sub-module: its weights stay out of this state dict, ``.to()`` and ``.parameters()``."""
        self._vqvae_proxy = (vqvae,)

    @property
    def vqvae(self) -> NextInputVQVAE:
        if not self._vqvae_proxy:
            raise RuntimeError("no VQ-VAE bound: call bind_vqvae(vqvae) or pass vqvae=... to sample()")
        return self._vqvae_proxy[0]

    # ------------------------------------------------------------------ condition and input embeddings
    def drop_labels(self, label_B: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null class with probability ``cond_drop_rate`` (CFG training)."""
        drop_B = torch.rand(label_B.shape[0], device=label_B.device) < self.cond_drop_rate
        return torch.where(drop_B, self.null_class, label_B)

    def cond(self, label_B: torch.Tensor) -> torch.Tensor:
        """cond_BD: the class embedding, used both as the AdaLN condition and as the start token's content."""
        return self.class_emb(label_B)

    def _lvl_pos(self, begin: int, end: int) -> torch.Tensor:
        """Level + absolute position embedding of tokens [begin, end), shape (1, end - begin, C)."""
        return self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]

    def _sos(self, cond_BD: torch.Tensor) -> torch.Tensor:
        B = cond_BD.shape[0]
        return cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)

    def embed_teacher(self, cond_BD: torch.Tensor, teacher_input_BlCvae: torch.Tensor) -> torch.Tensor:
        """x_BLC for teacher forcing: start token, then ``word_embed`` of scales 1..K-1's inputs.

        ``teacher_input_BlCvae`` (B, L - first_l, Cvae) is the VQ-VAE's teacher-forcing input (the running
        reconstruction down-sampled to each next scale). Computed with autocast off, as VAR does.
        """
        expected = self.L - self.first_l
        if teacher_input_BlCvae.shape[1] != expected:
            raise ValueError(
                f"teacher input has {teacher_input_BlCvae.shape[1]} tokens, expected L - first_l = {expected}"
            )
        with _autocast_off(cond_BD.device):
            words_BlC = self.word_embed(teacher_input_BlCvae.to(self.word_embed.weight.dtype))
            x_BLC = torch.cat((self._sos(cond_BD), words_BlC), dim=1)
            return x_BLC + self._lvl_pos(0, self.L)

    def embed_first_scale(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """x_B1C: the input of scale 0 during generation (the start token)."""
        with _autocast_off(cond_BD.device):
            return self._sos(cond_BD) + self._lvl_pos(0, self.first_l)

    def embed_scale(self, k: int, next_BlCvae: torch.Tensor) -> torch.Tensor:
        """x_BlC: the input of scale ``k >= 1`` from the VQ-VAE's ``next_input`` of scale k-1."""
        begin, end = self.schedule.begin_end[k]
        with _autocast_off(next_BlCvae.device):
            return self.word_embed(next_BlCvae.to(self.word_embed.weight.dtype)) + self._lvl_pos(begin, end)

    # ------------------------------------------------------------------ transformer and head
    def decode(
        self,
        x_BlC: torch.Tensor,
        cond_BD: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        cache: VARKVCache | None = None,
        ada: AdaLNConditions | None = None,
    ) -> torch.Tensor:
        """Blocks, then the AdaLN head: fp32 logits_BlV.

        ``attn_bias=None`` is no mask: with ``cache`` the current scale sees itself and every cached scale
        (generation). Training passes ``self.attn_bias_for_masking`` (block-causal) over the full L tokens.
        ``ada``: :meth:`adaln_conditions` of ``cond_BD`` when the caller keeps them; None computes them inside
        each block (training, whose autograd graph stays as it was).
        """
        x_BlC, cond_blocks_BD = self._blocks_inputs(x_BlC, cond_BD)
        for i, block in enumerate(self.blocks):
            ada_B16C = None if ada is None else ada.blocks[i]
            x_BlC = block(x_BlC, cond_blocks_BD, attn_bias=attn_bias, cache=cache, ada_B16C=ada_B16C)
        return self.get_logits(x_BlC, cond_BD, None if ada is None else ada.head)

    def _blocks_inputs(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As VAR: under autocast the blocks (residual stream included) run in the autocast dtype."""
        if torch.is_autocast_enabled(x_BlC.device.type):
            dtype = torch.get_autocast_dtype(x_BlC.device.type)
            return x_BlC.to(dtype), cond_BD.to(dtype)
        return x_BlC, cond_BD

    def blocks_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the blocks compute in: the autocast dtype when autocast is on, else the weights' dtype."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.head.weight.dtype

    def adaln_conditions(self, cond_BD: torch.Tensor) -> AdaLNConditions:
        """Every block's and the head's modulation of ``cond_BD``, in the dtypes ``decode`` computes them in
        (call under the same autocast state as ``decode``): ``decode(..., ada=...)`` then skips them."""
        _, cond_blocks_BD = self._blocks_inputs(cond_BD, cond_BD)
        dtype = self.head.weight.dtype
        with _autocast_off(cond_BD.device):
            head_B12C = self.head_nm.modulation(cond_BD.to(dtype))
        return AdaLNConditions([block.modulation(cond_blocks_BD) for block in self.blocks], head_B12C)

    def get_logits(
        self, h_BlC: torch.Tensor, cond_BD: torch.Tensor, ada_B12C: torch.Tensor | None = None
    ) -> torch.Tensor:
        """head(head_nm(h, cond)) in the weights' dtype with autocast off, returned as fp32.

        VAR upcasts the head's input and output but leaves autocast on, so its head matmul ran in fp16; here
        an fp32 model computes the logits fully in fp32, and a model cast to bf16 (as VARGPT trains) in bf16.
        """
        dtype = self.head.weight.dtype
        with _autocast_off(h_BlC.device):
            return self.head(self.head_nm(h_BlC.to(dtype), cond_BD.to(dtype), ada_B12C)).float()

    def forward(self, label_B: torch.Tensor, teacher_input_BlCvae: torch.Tensor) -> torch.Tensor:
        """VAR's teacher-forced forward: logits_BLV (fp32) for all L tokens.

        Deviation: VAR drops labels in eval mode too (its validation loss sees 10 % null classes); here only
        in training mode, so eval is deterministic. VAR's progressive training (``prog_si``) is not supported.
        """
        if self.training:
            label_B = self.drop_labels(label_B)
        cond_BD = self.cond(label_B)
        x_BLC = self.embed_teacher(cond_BD, teacher_input_BlCvae)
        return self.decode(x_BLC, cond_BD, attn_bias=self.attn_bias_for_masking)

    # ------------------------------------------------------------------ generation
    def new_kv_cache(self, rows: int, device: torch.device, reuse: bool = False) -> VARKVCache:
        """An empty preallocated KV cache for ``rows`` rows of one image (capacity L), in the dtype the blocks
        compute in under the current autocast state.

        ``reuse``: the same buffers as the previous call with these rows, dtype and device (rewound), as CUDA
        graphs need (their static inputs keep their addresses); only for one generation at a time per VAR.
        """
        key = (rows, self.blocks_dtype(device), torch.device(device))
        if reuse and key in self._kv_pool:
            cache = self._kv_pool[key]
            cache.rewind()
            return cache
        cache = VARKVCache(capacity=self.L)
        cache.allocate(len(self.blocks), (rows, self.num_heads, self.C // self.num_heads), key[1], device)
        if reuse:
            self._kv_pool[key] = cache
        return cache

    @torch.no_grad()
    def sample(
        self,
        class_labels_B: torch.Tensor | Sequence[int],
        cfg: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        seeds: Sequence[int] | None = None,
        cfg_schedule: str = "ramp",
        vqvae: NextInputVQVAE | None = None,
        options: ScaleStepOptions | None = None,
    ) -> list[torch.Tensor]:
        """Class-conditional generation (VAR's ``autoregressive_infer_cfg``); returns K code maps (B, p_k^2).

        The batch is doubled: conditional rows, then the same number of null-class rows; per scale the logits
        are ``(1 + t) * cond - t * uncond`` with ``t = cfg_ratio(cfg, k, K, cfg_schedule)``. Decode the codes
        with the VQ-VAE (``codes_to_img``). Call in eval mode (DropPath is active in training mode). The scale
        loop never reads a tensor value on the host. VAR returns the image and draws every sample's codes from
        one generator seeded with ``g_seed``; here sample i draws from its own generator seeded ``seeds[i]``
        (default: i), as VARGPT's decoder does, so a batched call gives the codes of one call per sample.
        ``options``: the scale step's fast paths (:class:`ScaleStepOptions`; None: its defaults).
        """
        vq = self.vqvae if vqvae is None else vqvae
        K = self.schedule.num_scales
        ratios = [cfg_ratio(cfg, k, K, cfg_schedule) for k in range(K)]  # validates cfg_schedule up front
        device = self.lvl_1L.device
        label_B = torch.as_tensor(class_labels_B, dtype=torch.long, device=device).view(-1)
        B = label_B.shape[0]
        seeds = list(range(B)) if seeds is None else [int(seed) for seed in seeds]
        if len(seeds) != B:
            raise ValueError(f"got {len(seeds)} seeds for {B} class labels: pass one seed per sample")
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        sampler = ScaleSampler(self, vq, ratios, top_k, top_p, generators, options=options)
        cond_2BD = self.cond(torch.cat((label_B, torch.full_like(label_B, self.null_class))))
        x_2BlC = self.embed_first_scale(cond_2BD)
        codes: list[torch.Tensor] = []
        with sampler.autocast():  # one autocast region: its bf16 weight copies serve all K scales
            for k in range(K):
                out = sampler.step(k, x_2BlC, cond_2BD)
                codes.append(out.codes)
                if out.next_x is not None:
                    x_2BlC = out.next_x.repeat(2, 1, 1)
        return codes

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def init_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = -1
    ) -> None:
        """VAR's initialisation (``build_vae_var`` arguments as defaults).

        Every Linear/Embedding weight ~ trunc_normal(std) with std = sqrt(1/(3C)) when ``init_std < 0``,
        biases 0; the head scaled by ``init_head``; the AdaLN projections scaled by ``init_adaln``, except the
        gamma rows of the blocks (the first 2C outputs) by ``init_adaln_gamma`` so every block starts near
        identity; ``attn.proj`` and ``ffn.fc2`` divided by sqrt(2 depth) (GPT-2's residual scaling).
        """
        if init_std < 0:
            init_std = math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)

        if init_head >= 0:
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()

        residual_scale = math.sqrt(2 * len(self.blocks))
        for block in self.blocks:
            block.attn.proj.weight.div_(residual_scale)
            block.ffn.fc2.weight.div_(residual_scale)
            ada_lin = block.ada_lin[-1]
            ada_lin.weight[2 * self.C :].mul_(init_adaln)
            ada_lin.weight[: 2 * self.C].mul_(init_adaln_gamma)
            ada_lin.bias.zero_()

    def extra_repr(self) -> str:
        return f"patch_nums={self.schedule.patch_nums}, drop_path_rate={self.drop_path_rate:g}"


def build_var(
    depth: int,
    vocab_size: int = 4096,
    z_channels: int = 32,
    num_classes: int = 1000,
    patch_nums: Sequence[int] = VAR_PATCH_NUMS,
    attn_l2_norm: bool = True,
    **kwargs,
) -> VAR:
    """VAR-d``depth`` as VAR's ``build_vae_var`` makes it (width 64 depth, depth heads), initialised."""
    var = VAR(
        depth,
        num_classes=num_classes,
        vocab_size=vocab_size,
        z_channels=z_channels,
        patch_nums=patch_nums,
        attn_l2_norm=attn_l2_norm,
        **kwargs,
    )
    var.init_weights()
    return var


def var_from_config(cfg: ModelConfig, num_classes: int, vqvae: NextInputVQVAE | None = None) -> VAR:
    """The VAR decoder a model config describes (sizes from ``cfg.var``, tokens from ``cfg.vqvae``), initialised."""
    var = VAR(
        depth=cfg.var.depth,
        embed_dim=cfg.var.embed_dim,
        num_heads=cfg.var.num_heads,
        num_classes=num_classes,
        vocab_size=cfg.vqvae.vocab_size,
        z_channels=cfg.vqvae.z_channels,
        patch_nums=tuple(cfg.vqvae.patch_nums),
        mlp_ratio=cfg.var.mlp_ratio,
        drop_path_rate=cfg.var.drop_path_rate,
        norm_eps=cfg.var.norm_eps,
        attn_l2_norm=cfg.var.attn_l2_norm,
        cond_drop_rate=cfg.var.cond_drop_rate,
        vqvae=vqvae,
    )
    var.init_weights()
    return var
