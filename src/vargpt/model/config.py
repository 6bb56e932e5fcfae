"""Typed configuration of a VARGPT model (the schema behind ``conf/model/*.yaml``).

Every size of the model (the tiny embedded default, the released 7B) is one instance of these dataclasses;
Hydra validates YAML against them at compose time, so a misspelt key fails naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from vargpt.model.scales import VAR_PATCH_NUMS, ScaleSchedule

# The checkout this package runs from (an editable install): configs name committed files relative to it with
# ${vargpt_repo:}, so they resolve the same from any working directory.
REPO_ROOT = Path(__file__).resolve().parents[3]


def register_resolvers() -> None:
    """Register ``${vargpt_repo:}`` with OmegaConf (idempotent)."""
    from omegaconf import OmegaConf  # here: the model package imports without omegaconf (the GPU image lacks it)

    if not OmegaConf.has_resolver("vargpt_repo"):
        OmegaConf.register_new_resolver("vargpt_repo", lambda: str(REPO_ROOT))


@dataclass
class LLMConfig:
    """The language model, built by transformers from ``model_type`` (llama; qwen2 goes through the same code)."""

    model_type: str = "llama"
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    intermediate_size: int = 11008
    vocab_size: int = 32064
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    hidden_act: str = "silu"
    # Anything else the transformers config of ``model_type`` accepts (e.g. attention_bias for qwen2).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class VisionConfig:
    """The CLIP vision tower (transformers' CLIPVisionModel) and its preprocessing."""

    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    patch_size: int = 14
    image_size: int = 336
    projection_dim: int = 768
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # hidden_states index whose patch tokens feed the projector (LLaVA: -2, the penultimate layer; CLS dropped).
    feature_layer: int = -2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def num_image_tokens(self) -> int:
        """Tokens one ``<image>`` placeholder expands to (576 for CLIP-L/14 at 336 px)."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class VQVAEConfig:
    """VAR's multi-scale residual VQ-VAE (``vae_ch160v4096z32`` by default)."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    beta: float = 0.25
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    using_sa: bool = True
    using_mid_sa: bool = True
    # GroupNorm groups of every norm: 32 in VAR (all released checkpoints); fewer lets tiny models go below 32
    # channels, which is what makes a 64-px VQ-VAE trainable on a CPU.
    norm_groups: int = 32
    patch_nums: tuple[int, ...] = VAR_PATCH_NUMS
    # Side of the generated images; must equal patch_nums[-1] * 2 ** (len(ch_mult) - 1).
    image_size: int = 256

    @property
    def schedule(self) -> ScaleSchedule:
        return ScaleSchedule(tuple(self.patch_nums))

    def validate(self) -> None:
        down = 2 ** (len(self.ch_mult) - 1)
        if self.patch_nums[-1] * down != self.image_size:
            raise ValueError(
                f"model.vqvae.image_size={self.image_size} must equal patch_nums[-1] * 2**(len(ch_mult)-1) = "
                f"{self.patch_nums[-1]} * {down}"
            )


@dataclass
class VARConfig:
    """The VAR visual decoder (VAR-d30 in the release: width 1920, 30 heads)."""

    depth: int = 30
    embed_dim: int | None = None  # default: depth * 64
    num_heads: int | None = None  # default: depth
    mlp_ratio: float = 4.0
    drop_path_rate: float | None = None  # default: 0.1 * depth / 24 (VAR's rule; 0.125 for d30)
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1


class ImageLossReduction(Enum):
    """How the image loss averages the per-token CE of the L = sum(p_k^2) code positions.

    token: uniform over all L tokens (VAR, VARGPT): the 1x1 first scale weighs 1/L.
    scale: each scale's mean CE weighs 1/K: not in the paper. On the shapes world (docs/backbones.md) it made
    the first scale read the prompt (teacher-forced CE with the right prompt 1.7 vs 4.9 with another's; 2.6 vs
    2.7 with ``token``) and the generated backgrounds follow the instruction, but not the objects.
    """

    token = "token"
    scale = "scale"


@dataclass
class ModelConfig:
    """A whole VARGPT model: LLM, vision tower, understanding projector, VQ-VAE, VAR decoder, gen projectors."""

    name: str = "vargpt_llava_7b"
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    var: VARConfig = field(default_factory=VARConfig)
    projector_hidden_act: str = "gelu"
    # Weights of the two losses in the total (the release: 1:1).
    text_loss_weight: float = 1.0
    image_loss_weight: float = 1.0
    image_loss_reduction: ImageLossReduction = ImageLossReduction.token
    # Local folder of the HF tokenizer holding the five special tokens (tokens.py); null = none yet.
    tokenizer: str | None = None
    # Where the weights come from: null (random init), a released VARGPT folder, a stage checkpoint, or the
    # embedded backbones folder; resolved by the checkpoint adapters.
    init_from: str | None = None


def load_model_config(path: str | Path, overrides: list[str] | None = None) -> ModelConfig:
    """Read a ``conf/model/*.yaml`` file into a validated ModelConfig (outside Hydra: notebooks, tools, tests)."""
    from omegaconf import OmegaConf  # here: the model package imports without omegaconf (the GPU image lacks it)

    register_resolvers()
    schema = OmegaConf.structured(ModelConfig)
    merged = OmegaConf.merge(schema, OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides or [])))
    cfg: ModelConfig = OmegaConf.to_object(merged)
    cfg.vqvae.validate()
    return cfg
