"""Stage-1 init as the release's prepare step: LLaVA-hf (old and new key layouts) + VAR .pth + VQ-VAE .pth.

LLM, CLIP and projector come from LLaVA, the VQ-VAE strictly, VAR where shapes match (so the class embedding is
skipped and initialised), the three generation tokens are appended to LLaVA's tokenizer and use its padded
embedding rows without a resize; the same plan holds for the 7B key lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_checkpoint_released import RELEASED_IDS, ReferenceSource

from vargpt.checkpoint import CheckpointMismatchError, init_stage1, load_stage1, load_weights
from vargpt.model import SpecialTokenIds, build_var, build_vargpt, load_model_config
from vargpt.model.vqvae import vqvae_from_config
from vargpt.tokens import GEN_TOKENS

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
LLAVA_PREFIXES = ("vision_tower.", "multi_modal_projector.", "language_model.")


def llava_like_tokenizer(folder: Path):
    """A LLaVA-1.5-style tokenizer: <unk> <s> </s>, words, then <image> and <pad>; no generation tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["a", "an", "the", "red", "green", "blue", "circle", "square", "triangle", "star", "draw"]
    words += ["above", "below", "left", "right", "of"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    hf.add_special_tokens({"pad_token": "<pad>"})
    hf.save_pretrained(str(folder))
    return hf


@pytest.fixture(scope="module")
def cfg():
    return load_model_config(CONF / "tiny.yaml")


@pytest.fixture(scope="module")
def parts(cfg, tmp_path_factory):
    """A tiny llava-hf folder (both key layouts), a VAR .pth with 10 classes and a VQ-VAE .pth."""
    root = tmp_path_factory.mktemp("stage1")
    torch.manual_seed(123)
    donor = build_vargpt(cfg, SpecialTokenIds(image=3, pad=4, gen_start=5, gen_end=6, gen_pad=7, eos=2, bos=1))
    llava_state = {k: v for k, v in donor.state_dict().items() if k.startswith(LLAVA_PREFIXES)}
    folders = {}
    for layout in ("old", "new"):
        folder = root / f"llava-{layout}"
        folder.mkdir()
        state = llava_state if layout == "old" else {_newer(k): v for k, v in llava_state.items()}
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"model_type": "llava", "image_token_index": 32000}))
        llava_like_tokenizer(folder)
        folders[layout] = folder
    v = cfg.var
    var = build_var(
        v.depth, cfg.vqvae.vocab_size, cfg.vqvae.z_channels, num_classes=10, patch_nums=tuple(cfg.vqvae.patch_nums),
        embed_dim=v.embed_dim, num_heads=v.num_heads, drop_path_rate=0.0,
    )  # fmt: skip
    torch.save(var.state_dict(), root / "var_d4.pth")
    q = cfg.vqvae
    vqvae = vqvae_from_config(q)
    torch.save(vqvae.state_dict(), root / "vae_tiny.pth")
    return {
        "llava": folders,
        "llava_state": llava_state,
        "var": root / "var_d4.pth",
        "var_state": var.state_dict(),
        "vqvae": root / "vae_tiny.pth",
        "vqvae_state": vqvae.state_dict(),
    }


def _newer(k: str) -> str:
    """llava-hf names of transformers >= 4.52."""
    if k.startswith("language_model.model."):
        return "model.language_model." + k.removeprefix("language_model.model.")
    if k.startswith("language_model.lm_head."):
        return k.removeprefix("language_model.")
    return "model." + k


def _check_stage1(model, report, parts) -> None:
    sd = model.state_dict()
    for k, v in parts["llava_state"].items():
        assert torch.equal(sd[k], v), k
    for k, v in parts["vqvae_state"].items():
        assert torch.equal(sd["vae_local." + k], v), k
    for k, v in parts["var_state"].items():
        if k != "class_emb.weight":
            assert torch.equal(sd["vargpt_gen." + k], v), k
    rows = model.ids.gen_start + 2
    assert sd["vargpt_gen.class_emb.weight"].shape[0] == rows != parts["var_state"]["class_emb.weight"].shape[0]
    assert report.ok and not report.missing and not report.unexpected
    assert set(report.reshaped) == {"vargpt_gen.class_emb.weight"}
    assert "widened" in report.initialised["vargpt_gen.class_emb.weight"]
    new = {k for k in report.initialised if k.startswith("image_gen_projector")}
    assert new == {k for k in sd if k.startswith("image_gen_projector")} and len(new) == 12
    assert set(report.initialised) == new | {"vargpt_gen.class_emb.weight"}
    assert len(report.loaded) == len(sd) - len(report.initialised)


@pytest.mark.parametrize("layout", ["old", "new"])
def test_stage1_init_follows_the_prepare_step(cfg, parts, layout):
    llava = parts["llava"][layout]
    torch.manual_seed(0)
    model, tokenizer, report = init_stage1(cfg, llava, var=parts["var"], vqvae=parts["vqvae"])
    # The three tokens follow <image> and <pad> in LLaVA's vocabulary (the release: 32002-32004 after 32000-32001).
    base = len(llava_like_tokenizer(llava.parent / f"tok-{layout}"))
    assert [tokenizer.convert_tokens_to_ids(t) for t in GEN_TOKENS] == [base, base + 1, base + 2]
    assert (model.ids.image, model.ids.pad) == (base - 2, base - 1)
    assert (model.ids.gen_start, model.ids.gen_end, model.ids.gen_pad) == (base, base + 1, base + 2)
    # No resize: the padded embedding keeps its rows; the new tokens use LLaVA's rows as they are.
    emb = model.language_model.get_input_embeddings().weight
    assert emb.shape[0] == cfg.llm.vocab_size
    donor_emb = parts["llava_state"]["language_model.model.embed_tokens.weight"]
    assert torch.equal(emb[base : base + 3], donor_emb[base : base + 3])
    assert torch.equal(model.language_model.lm_head.weight, parts["llava_state"]["language_model.lm_head.weight"])
    _check_stage1(model, report, parts)
    assert any("no resize" in n for n in report.notes)
    if layout == "new":
        assert "4.52" in report.key_mapping
    # The class embedding keeps the model's own initialisation (same seed, same values).
    torch.manual_seed(0)
    plain = build_vargpt(cfg, tokenizer)
    assert torch.equal(model.vargpt_gen.class_emb.weight, plain.vargpt_gen.class_emb.weight)
    assert torch.equal(model.image_gen_projector.mlp[0].weight, plain.image_gen_projector.mlp[0].weight)


def test_stage1_from_an_init_from_string(cfg, parts):
    from vargpt.checkpoint import prepare_stage1_tokenizer

    tokenizer = prepare_stage1_tokenizer(parts["llava"]["old"])
    model = build_vargpt(cfg, tokenizer)
    spec = f"llava={parts['llava']['old']},var={parts['var']},vqvae={parts['vqvae']}"
    report = load_weights(model, spec)
    _check_stage1(model, report, parts)
    assert load_weights(model, {"llava": str(parts["llava"]["old"]), "var": parts["var"]}).ok


def test_one_component_alone_reports_the_rest_as_initialised(cfg, parts):
    from vargpt.checkpoint import prepare_stage1_tokenizer

    model = build_vargpt(cfg, prepare_stage1_tokenizer(parts["llava"]["old"]))
    report = load_weights(model, parts["var"])
    assert report.ok
    assert all(k.startswith("vargpt_gen.") for k in report.loaded)
    assert len(report.loaded) == len(parts["var_state"]) - 1
    assert "no llava checkpoint given" in report.initialised["language_model.lm_head.weight"]
    assert "no vqvae checkpoint given" in report.initialised["vae_local.quant_conv.weight"]


def test_tokenizer_that_disagrees_with_the_model_is_a_strict_error(cfg, parts):
    """A model whose ids are not LLaVA's tokenizer + the generation tokens would index the wrong rows."""
    other_ids = SpecialTokenIds(image=3, pad=4, gen_start=30, gen_end=31, gen_pad=32, eos=2, bos=1)
    model = build_vargpt(cfg, other_ids)
    with pytest.raises(CheckpointMismatchError, match="gen_start"):
        load_weights(model, {"llava": parts["llava"]["old"]})


def test_stage1_plan_on_the_7b_key_lists(reference_lists):
    """With the released key lists standing in for llava-1.5-7b-hf, var_d30.pth and vae_ch160v4096z32.pth, the
    7B model loads everything but the 32004-row class embedding and the two new projectors."""
    released = reference_lists("vargpt_llava_v1")
    llava = {k: v for k, v in released.items() if k.startswith(LLAVA_PREFIXES)}
    cfg = load_model_config(CONF / "vargpt_llava_7b.yaml")
    with torch.device("meta"):
        model = build_vargpt(cfg, RELEASED_IDS)
    report = load_stage1(
        model,
        llava=ReferenceSource(llava, rename=_newer),
        var=ReferenceSource(reference_lists("var_d30")),
        vqvae=ReferenceSource(reference_lists("vae_ch160v4096z32")),
    )
    assert report.ok
    assert report.reshaped == {"vargpt_gen.class_emb.weight": ((1001, 1920), (32004, 1920))}
    assert len(report.loaded) == len(released) - 13
    assert "transformers>=4.52" in report.key_mapping
    n_new = sum(p.numel() for n, p in model.named_parameters() if n.startswith("image_gen_projector"))
    assert report.count(report.initialised)[1] == n_new + 32004 * 1920
