"""Stage-1 initialisation from LLaVA-1.5 + VAR + its VQ-VAE, exactly as the release's prepare step does it.

VARGPT-REFERENCE.md 1.2 / 1.3 (``V11 visionllm/vargpt_llava/prepare_vargpt_llava.py``):

* ``llava-hf/llava-1.5-7b-hf``: its whole state dict (LLM, CLIP tower, understanding projector) is loaded into
  the model. Older (released names) and newer (transformers >= 4.52: ``model.language_model.*``, ``lm_head.*``)
  llava-hf key layouts are both accepted (:func:`~vargpt.checkpoint.released.released_key_names`). The
  embedding is **not** resized: the three generation tokens are appended to LLaVA's tokenizer (ids 32002-32004
  after ``<image>`` 32000 and ``<pad>`` 32001) and use those rows of LLaVA's 32064-row padded embedding and
  LM head as they are;
* ``vae_ch160v4096z32.pth`` -> ``vae_local`` (strict);
* ``var_d30.pth`` -> ``vargpt_gen``, keeping the keys whose shapes match, so ``class_emb`` (1001 ImageNet rows
  vs ``gen_start_id + 2``) is skipped and keeps the model's initialisation (VAR's trunc-normal; the release got
  HF's ``post_init`` values, which no released file records);
* the generation projectors (``image_gen_projector``, ``image_gen_projector_out``) exist in no checkpoint and
  keep the model's initialisation.

Differences from the release, both deliberate: our report lists every skipped key (the release prints only the
class embedding), and a strict load (default) fails on any other mismatch instead of silently loading with
``strict=False``. Any component may be left out; its keys are then reported as initialised.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

from torch import nn

from vargpt.checkpoint.io import TensorSource, open_checkpoint, with_prefix
from vargpt.checkpoint.match import DEFAULT_RULES, Rule, Rules, Target, apply_load, plan_load
from vargpt.checkpoint.released import LLAVA_MODULES, as_released, folder_tokenizer
from vargpt.checkpoint.report import LoadReport
from vargpt.checkpoint.var_io import VAR_HEADS, VQVAE_HEADS, unwrapped
from vargpt.model.vargpt import build_vargpt
from vargpt.tokens import GEN_TOKENS, SpecialTokenIds

log = logging.getLogger(__name__)

COMPONENTS = ("llava", "var", "vqvae")
_PREFIXES = {
    "llava": tuple(m + "." for m in LLAVA_MODULES),
    "var": ("vargpt_gen.",),
    "vqvae": ("vae_local.",),
}
NEW_IN_VARGPT = ("image_gen_projector.", "image_gen_projector_out.")

CLASS_EMB_REASON = (
    "class embedding widened to the tokenizer's generation rows (gen_start_id + 2); VAR's class rows do not fit, "
    "so it keeps the model's initialisation, as the release re-initialised it"
)
STAGE1_RULES = DEFAULT_RULES + Rules(
    allow_missing=(Rule(r"vargpt_gen\.class_emb\.weight", CLASS_EMB_REASON),),
    allow_reshape=(Rule(r"vargpt_gen\.class_emb\.weight", CLASS_EMB_REASON),),
)


def prepare_stage1_tokenizer(llava: str | Path | Any) -> Any:
    """LLaVA's tokenizer (a local folder, or a tokenizer object) with the three generation tokens appended as
    additional special tokens, in the release's order; unchanged when it already has them."""
    tok = folder_tokenizer(llava) if isinstance(llava, str | Path) else llava
    if tok is None:
        raise FileNotFoundError(f"{llava}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    vocab = tok.get_vocab()
    missing = [t for t in GEN_TOKENS if t not in vocab]
    if missing:
        params = inspect.signature(tok.add_special_tokens).parameters
        # transformers 4.x calls it replace_additional_special_tokens, 5.x replace_extra_special_tokens.
        keep = {n: False for n in ("replace_additional_special_tokens", "replace_extra_special_tokens") if n in params}
        tok.add_special_tokens({"additional_special_tokens": missing}, **keep)
    return tok


def load_stage1(
    model: nn.Module,
    llava: str | Path | TensorSource | None = None,
    var: str | Path | TensorSource | None = None,
    vqvae: str | Path | TensorSource | None = None,
    strict: bool = True,
) -> LoadReport:
    """Initialise a VARGPT from the given components (see the module docstring); returns the merged report.

    Strict (default): every key of a given component must fit, except the accepted ones (class embedding,
    default rules); nothing is copied when it raises.
    """
    given = {"llava": llava, "var": var, "vqvae": vqvae}
    if all(v is None for v in given.values()):
        raise ValueError("stage-1 init needs at least one of llava=, var=, vqvae=")
    target = Target.of(model)
    label = " + ".join(f"{k}={_label(v)}" for k, v in given.items() if v is not None)
    report = LoadReport(source=label, target=f"{type(model).__name__} (stage-1 init)")
    report.buffers = set(target.buffers)
    plans: list[tuple[LoadReport, TensorSource]] = []

    if llava is not None:
        src, how = as_released(llava if isinstance(llava, TensorSource) else open_checkpoint(llava))
        part = plan_load(target.restrict(_PREFIXES["llava"]), src, DEFAULT_RULES, target_label="llava part")
        part.key_mapping = f"llava: {how}" if how else None
        part.conflicts += _tokenizer_conflicts(llava, getattr(model, "ids", None), part)
        plans.append((part, src))
    if vqvae is not None:
        raw = vqvae if isinstance(vqvae, TensorSource) else open_checkpoint(vqvae)
        src = with_prefix(unwrapped(raw, VQVAE_HEADS), "vae_local.")
        plans.append((plan_load(target.restrict(_PREFIXES["vqvae"]), src, DEFAULT_RULES), src))
    if var is not None:
        raw = var if isinstance(var, TensorSource) else open_checkpoint(var)
        src = with_prefix(unwrapped(raw, VAR_HEADS), "vargpt_gen.")
        plans.append((plan_load(target.restrict(_PREFIXES["var"]), src, STAGE1_RULES), src))
    for part, _ in plans:
        report.merge(part)
    for name, value in given.items():
        if value is None:
            for k in target.restrict(_PREFIXES[name]).layout:
                report.initialised[k] = f"no {name} checkpoint given: the model's initialisation"
                report.numel[k] = _numel(target, k)
    for k in target.restrict(NEW_IN_VARGPT).layout:
        report.initialised[k] = "new in VARGPT (in no released component): the model's initialisation"
        report.numel[k] = _numel(target, k)
    report.raise_if_strict(strict)
    for part, src in plans:
        apply_load(model, src, part)
        report.notes += [n for n in part.notes if n not in report.notes]
    return report


def init_stage1(
    cfg: Any,
    llava: str | Path,
    var: str | Path | None = None,
    vqvae: str | Path | None = None,
    strict: bool = True,
) -> tuple[nn.Module, Any, LoadReport]:
    """Build a VARGPT for ``cfg`` with LLaVA's tokenizer + the generation tokens, and initialise it as the
    release's prepare step does: ``(model, tokenizer, report)``. Export with ``export_released`` to get the
    folder the release calls ``VARGPT_LLaVA-7B``."""
    tokenizer = prepare_stage1_tokenizer(llava)
    model = build_vargpt(cfg, tokenizer)
    report = load_stage1(model, llava=llava, var=var, vqvae=vqvae, strict=strict)
    return model, tokenizer, report


def _tokenizer_conflicts(llava: Any, ids: SpecialTokenIds | None, report: LoadReport) -> list[str]:
    """The ids LLaVA's tokenizer gives the special tokens once the generation tokens are appended must be the
    model's (otherwise the embedding rows the model uses are not the ones the data will index)."""
    if ids is None or not isinstance(llava, str | Path) or not Path(llava).is_dir():
        return []
    try:
        tok = folder_tokenizer(llava)
        if tok is None:
            report.notes.append(f"{llava}: no tokenizer files; the special token ids were not checked")
            return []
        theirs = SpecialTokenIds.from_tokenizer(prepare_stage1_tokenizer(tok))
    except Exception as err:  # a tokenizer we cannot read is a note, not a failed load
        report.notes.append(f"{llava}: tokenizer not checked ({type(err).__name__}: {err})")
        return []
    out = []
    for name in ("image", "pad", "gen_start", "gen_end", "gen_pad"):
        a, b = getattr(theirs, name), getattr(ids, name)
        if a != b:
            out.append(f"token {name}: LLaVA's tokenizer + generation tokens gives id {a}, the model uses {b}")
    if not out:
        report.notes.append(
            f"generation tokens at ids {ids.gen_start}-{ids.gen_pad} use those rows of LLaVA's embedding and LM head "
            "as they are (no resize)"
        )
    return out


def _label(v: Any) -> str:
    return v.label if isinstance(v, TensorSource) else str(v)


def _numel(target: Target, key: str) -> int:
    n = 1
    for s in target.layout[key][0]:
        n *= s
    return n
