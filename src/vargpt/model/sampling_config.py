"""How ``vargpt.inference.generate`` samples: the typed schema behind ``conf/sampling/*.yaml``.

One dataclass for text and images. The defaults reproduce the released VARGPT v1 inference
(VARGPT-REFERENCE.md 2.3): greedy text, and for images classifier-free guidance 1.5 ramped over the scales
(t = cfg * k / (K - 1)), top-k 900, top-p 0.96, with the release's unconditional branch (Gaussian noise in
place of the LLM hidden states, the null class row for both halves). Everything is validated on
construction, so a bad value fails with the key's name before any compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from vargpt.model.sampling import CFG_SCHEDULES
from vargpt.model.scale_step import COMPILE_MODES, ScaleStepOptions

# The unconditional branch of classifier-free guidance for images:
#   release     - the released VARGPT v1: N(0, I) noise in place of the LLM hidden states and the null class row
#                 as the AdaLN condition of both halves (needed to reproduce the released weights' images);
#   null_prompt - a real unconditional LLM pass on an empty instruction (its own LLM cache); conditional half
#                 conditioned on the "generate" class row, unconditional half on the null row (as trained);
#   none        - no guidance: one pass, "generate" class row (cfg is ignored).
UNCOND_MODES: tuple[str, ...] = ("release", "null_prompt", "none")


@dataclass
class SamplingConfig:
    """Sampling of one ``generate`` call (text decoding, image budget, image code sampling, seed)."""

    # ---- text
    greedy: bool = True  # argmax decoding (the release); False = sample with the temperature below
    temperature: float = 1.0  # softmax temperature when not greedy
    text_top_k: int = 0  # optional top-k filter for sampled text (0 = off)
    text_top_p: float = 0.0  # optional top-p filter for sampled text (0 = off)
    max_new_tokens: int = 256  # text-loop steps per reply (each image's start token counts as one)
    stop: list[str] = field(default_factory=list)  # the reply ends before the first occurrence of any of these
    # ---- images
    max_images: int = 1  # images per reply; once used up the model cannot start another
    cfg: float = 1.5  # guidance strength at the last scale (released value)
    cfg_schedule: str = "ramp"  # ramp: t = cfg * k / (K - 1) (VAR / VARGPT); constant: t = cfg at every scale
    top_k: int = 900  # code sampling: keep the top-k logits (0 = off, 1 = greedy)
    top_p: float = 0.96  # code sampling: nucleus mass (0 = off)
    uncond: str = "release"  # release | null_prompt | none, see UNCOND_MODES
    # ---- the VAR scale step's fast paths (ScaleStepOptions; the ones on by default keep fp32 codes exact)
    var_cache_adaln: bool = True  # AdaLN modulations once per image, not per scale
    var_static_cache: bool = True  # preallocated KV cache written in place
    var_fast_filter: bool = False  # top-k / top-p without a full sort (same codes but on exact fp32 ties)
    var_bf16: bool = False  # VAR blocks under bf16 autocast (faster; codes differ from fp32's)
    var_compile: str = "off"  # torch.compile mode of the per-scale decoder, see COMPILE_MODES
    # ---- the VQ-VAE decoder's and the LLM's fast paths (vargpt.model.vqvae.DecodeOptions, inference.FastPaths)
    vq_fast: bool = True  # channels-last and the phase-split upsample convs (fp32 rounding of the plain decoder)
    vq_bf16: bool = False  # bf16 autocast over the decoder (up to ~4/255 off fp32: opt-in)
    llm_mask_4d: bool = True  # the LLM continuations' attention mask built once here, not by transformers
    # ---- randomness
    seed: int = 0  # sample i of a call gets torch.Generator seeded with seed + i (unless seeds are passed)

    def __post_init__(self) -> None:
        self.stop = [str(s) for s in (self.stop or [])]
        checks = [
            (self.temperature > 0, "temperature must be > 0"),
            (self.text_top_k >= 0, "text_top_k must be >= 0"),
            (0.0 <= self.text_top_p <= 1.0, "text_top_p must be in [0, 1]"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (all(self.stop), "stop strings must be non-empty"),
            (self.max_images >= 0, "max_images must be >= 0"),
            (self.cfg >= 0, "cfg must be >= 0"),
            (self.cfg_schedule in CFG_SCHEDULES, f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0.0 <= self.top_p <= 1.0, "top_p must be in [0, 1]"),
            (self.uncond in UNCOND_MODES, f"uncond must be one of {', '.join(UNCOND_MODES)}"),
            (self.var_compile in COMPILE_MODES, f"var_compile must be one of {', '.join(COMPILE_MODES)}"),
            (self.var_static_cache or self.var_compile == "off", "var_compile needs var_static_cache"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"sampling: {msg} (got {self.to_dict()})")

    @classmethod
    def coerce(cls, sampling: Any = None, **overrides: Any) -> SamplingConfig:
        """A SamplingConfig from None (defaults), an instance, a dict or an OmegaConf node; unknown keys fail."""
        if sampling is None:
            values: dict[str, Any] = {}
        elif isinstance(sampling, SamplingConfig):
            values = sampling.to_dict()
        else:
            try:
                from omegaconf import DictConfig, OmegaConf

                if isinstance(sampling, DictConfig):
                    sampling = OmegaConf.to_container(sampling, resolve=True)
            except ImportError:  # pragma: no cover - omegaconf is a dependency
                pass
            if not isinstance(sampling, dict):
                raise TypeError(f"sampling must be a SamplingConfig, a dict or None, not {type(sampling).__name__}")
            values = dict(sampling)
        values.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"sampling: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    def scale_step_options(self) -> ScaleStepOptions:
        """The VAR scale step's fast paths these settings ask for (``ScaleSampler(..., options=...)``)."""
        return ScaleStepOptions(
            cache_adaln=self.var_cache_adaln,
            static_cache=self.var_static_cache,
            fast_filter=self.var_fast_filter,
            bf16=self.var_bf16,
            compile=self.var_compile,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
