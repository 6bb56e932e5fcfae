"""Mixed-modal generation: batching, KV caches, teacher forcing, call counts, round trips, limits, bad inputs.

Everything runs the tiny model (conf/model/tiny.yaml) on CPU with a world tokenizer trained in a temp folder.
A random model never emits ``<|image_gen_start|>`` by itself, so images are requested with ``force_image``
or by a logits processor that biases the start token at a chosen step.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from llama_tokenizer import llama_style_tokenizer
from PIL import Image

from vargpt.config import register_configs
from vargpt.data.chat import tokenize_conversation
from vargpt.data.tokenizer import train_world_tokenizer
from vargpt.inference import GenerationStats, generate
from vargpt.inference.fast_paths import FastPaths
from vargpt.model import build_vargpt, load_model_config
from vargpt.model.sampling import cfg_ratio
from vargpt.model.sampling_config import SamplingConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
TEXTS = [
    "Draw a red circle on a white background.",
    "Here is a blue square in the middle.",
    "What colour is the shape? It is green.",
    "Describe the image. A small yellow triangle at the top left.",
    "How many objects are there? Two purple circles.",
] * 20
PROMPTS = ["Draw a red circle", "What colour is the shape in the middle of the picture?", "Describe the image."]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_world_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    m = build_vargpt(load_model_config(CONF / "tiny.yaml"), tokenizer)
    # Random init is too gentle to test anything: the LLM (std 0.02) answers every prompt with the same token,
    # and VAR's blocks start near identity (gamma 1e-5) with a tiny head. Larger weights make every token and
    # code depend on the context, the positions, the caches and the guidance.
    with torch.no_grad():
        for p in m.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
        for block in m.vargpt_gen.blocks:
            block.ada_lin[-1].weight.normal_(0, 0.05)
        m.vargpt_gen.head.weight.normal_(0, 0.05)
        for proj in (m.image_gen_projector, m.image_gen_projector_out):
            for p in proj.mlp.parameters():
                p.normal_(0, 0.1)
    return m.eval()


def start_at(steps: dict[int, int], gen_start: int, eos: int | None = None, eos_after: dict[int, int] | None = None):
    """A logits processor: sample ``i`` starts an image once its reply holds ``steps[i]`` tokens, and ends
    (eos) once it holds ``eos_after[i]`` tokens."""

    def proc(samples, reply_ids, logits):
        logits = logits.clone()
        for j, (i, ids) in enumerate(zip(samples, reply_ids, strict=True)):
            if len(ids) == steps.get(i, -1):
                logits[j, gen_start] += 1e4
            if eos_after is not None and len(ids) == eos_after.get(i, -1):
                logits[j, eos] += 1e4
        return logits

    return proc


# --------------------------------------------------------------------------------------------- batching
# Scenarios: which reply length starts an image / ends the reply, per sample. (a) the longest prompt ends
# first, so every other row's left padding is cut from the cache; (b) a row ends right after its image, so the
# image's columns (holes in the other rows) are cut; both have one-row image groups while other rows wait.
SCENARIOS = {
    "longest_prompt_ends_first": ("release", {0: 0, 1: 99, 2: 2}, {1: 2}, [1, 0, 1]),
    "row_ends_after_its_image": ("null_prompt", {0: 0, 1: 3, 2: 99}, {0: 2 + 130, 2: 4}, [1, 1, 0]),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_batched_equals_one_by_one(model, scenario):
    """Greedy text, sampled codes (top-k / top-p, seeded per sample): a batch of prompts of different lengths,
    starting images at different steps and finishing at different times, equals one call per sample."""
    uncond, steps, eos_after, n_images = SCENARIOS[scenario]
    ids = model.ids
    assert model.num_gen_tokens == 130  # the scenarios count reply lengths with the tiny model's L
    sampling = SamplingConfig(max_new_tokens=7, uncond=uncond, cfg=2.0, top_k=50, top_p=0.9, seed=11)
    proc = start_at(steps, ids.gen_start, ids.eos, eos_after)
    batched = generate(model, PROMPTS, sampling=sampling, logits_processor=proc)
    assert [len(o.images) for o in batched] == n_images
    assert [o.finish_reason for o in batched] == ["eos" if i in eos_after else "length" for i in range(3)]
    for i, prompt in enumerate(PROMPTS):
        single_proc = start_at({0: steps[i]}, ids.gen_start, ids.eos, {0: eos_after.get(i, -1)})
        (one,) = generate(model, [prompt], sampling=sampling, logits_processor=single_proc, seeds=[sampling.seed + i])
        assert one.token_ids == batched[i].token_ids
        assert one.text == batched[i].text
        for a, b in zip(one.image_codes, batched[i].image_codes, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        for a, b in zip(one.image_tensors, batched[i].image_tensors, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_seeds_reproduce_and_differ(model):
    sampling = SamplingConfig(max_new_tokens=1, top_k=50, top_p=0.9)
    a = generate(model, ["Draw a red circle"] * 2, sampling=sampling, force_image=True)
    b = generate(model, ["Draw a red circle"] * 2, sampling=sampling, force_image=True)
    codes = [torch.cat(o.image_codes[0]) for o in a]
    assert all(torch.equal(x, torch.cat(o.image_codes[0])) for x, o in zip(codes, b, strict=True))
    assert not torch.equal(codes[0], codes[1])  # seed + 0 and seed + 1


# --------------------------------------------------------------------------------------------- KV cache
def _masked_greedy(model, tokenizer, logits_V, n_images, max_images):
    """The generator's masking of never-valid tokens (and of the start token once the budget is used)."""
    never = [model.ids.image, model.ids.gen_pad, model.ids.gen_end, model.ids.pad]
    logits_V = logits_V.clone()
    logits_V[never] = float("-inf")
    logits_V[len(tokenizer) :] = float("-inf")
    if n_images >= max_images:
        logits_V[model.ids.gen_start] = float("-inf")
    return int(logits_V.argmax())


def _null_prompt_ids(model, tokenizer):
    tok = tokenize_conversation(
        [{"role": "user", "content": "<image>"}],
        tokenizer,
        model.ids,
        1,
        model.num_gen_tokens,
        add_generation_prompt=True,
    )
    return [t for t in tok.input_ids if t != model.ids.image]


@torch.no_grad()
def recompute_reference(model, tokenizer, prompt, *, uncond, cfg, max_new_tokens, start_step, seed):
    """Generation without any cache: every text step and every scale runs the LLM over the whole sequence and
    the VAR decoder over all scales so far (block-causal mask). Greedy text, argmax codes (top_k = 1), so the
    only random draws are the release's noise: (1, p_k^2, H) per scale from the sample's generator."""
    var, vq, lm = model.vargpt_gen, model.vae_local, model.language_model
    embed, gen_in, gen_out = lm.get_input_embeddings(), model.image_gen_projector, model.image_gen_projector_out
    ids, K, null, gen = model.ids, var.schedule.num_scales, var.null_class, model.gen_label
    g = torch.Generator().manual_seed(seed)

    def hidden(embeds):
        return lm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state

    def tok_embeds(token_ids):
        return embed(torch.tensor([token_ids]))

    prompt_ids = tokenize_conversation(
        [{"role": "user", "content": prompt}],
        tokenizer,
        ids,
        model.num_image_tokens,
        model.num_gen_tokens,
        add_generation_prompt=True,
    ).input_ids
    seq = tok_embeds(prompt_ids)
    null_seq = tok_embeds(_null_prompt_ids(model, tokenizer))
    reply, all_codes = [], []
    for _ in range(max_new_tokens):
        logits = lm.lm_head(hidden(seq)[0, -1]).float()
        if len(reply) == start_step:
            logits[ids.gen_start] += 1e4
        t = _masked_greedy(model, tokenizer, logits, len(all_codes), max_images=1)
        reply.append(t)
        if t == ids.eos:
            break
        if t != ids.gen_start:
            seq = torch.cat((seq, tok_embeds([t])), dim=1)
            continue
        # Class rows: the LLM's start-token content and the VAR's AdaLN condition (cond half, uncond half).
        llm_labels, var_labels = {
            "none": ([gen], [gen]),
            "null_prompt": ([gen, null], [gen, null]),
            "release": ([null], [null, null]),
        }[uncond]
        var_cond = var.cond(torch.tensor(var_labels))
        first = gen_in(var.embed_first_scale(var.cond(torch.tensor(llm_labels))))
        prefixes = [seq, null_seq][: len(llm_labels)]
        seqs = [torch.cat((s, tok_embeds([ids.gen_start]), first[b : b + 1]), dim=1) for b, s in enumerate(prefixes)]
        f_hat, codes, noise = None, [], []
        for k, (begin, end) in enumerate(var.schedule.begin_end):
            h = torch.cat([hidden(s)[:, -end:] for s in seqs])  # hidden states of every slot so far
            if uncond == "release":
                noise.append(torch.randn((1, end - begin, h.shape[-1]), generator=g))
                h = torch.cat((h, torch.cat(noise, dim=1)))
            bias = var.attn_bias_for_masking[..., :end, :end]
            logits_k = var.decode(gen_out(h), var_cond, attn_bias=bias)[:, begin:end]
            if len(var_labels) == 2:
                t_k = cfg_ratio(cfg, k, K, "ramp")
                logits_k = (1 + t_k) * logits_k[:1] - t_k * logits_k[1:]
            c = logits_k.argmax(-1)
            codes.append(c[0])
            f_hat, nxt = vq.next_input(k, f_hat, c)
            if nxt is not None:
                x = gen_in(var.embed_scale(k + 1, nxt))
                seqs = [torch.cat((s, x), dim=1) for s in seqs]
        all_codes.append(codes)
        seq = torch.cat((seqs[0], tok_embeds([ids.gen_end])), dim=1)
        reply += [ids.gen_pad] * model.num_gen_tokens + [ids.gen_end]
    return reply, all_codes


@pytest.mark.parametrize("uncond", ["none", "null_prompt", "release"])
def test_kv_cached_equals_recompute(model, tokenizer, uncond):
    """Text tokens and image codes (greedy, top_k = 1) of the cached batched loop equal a no-cache reference."""
    steps = {0: 0, 1: 2, 2: 99}
    sampling = SamplingConfig(max_new_tokens=5, uncond=uncond, cfg=3.0, top_k=1)
    outs = generate(model, PROMPTS, sampling=sampling, logits_processor=start_at(steps, model.ids.gen_start))
    for i, prompt in enumerate(PROMPTS):
        ref_ids, ref_codes = recompute_reference(
            model, tokenizer, prompt, uncond=uncond, cfg=3.0, max_new_tokens=5, start_step=steps[i], seed=i
        )
        assert outs[i].token_ids == ref_ids
        assert len(outs[i].image_codes) == len(ref_codes) == (1 if steps[i] < 5 else 0)
        for got, ref in zip(outs[i].image_codes, ref_codes, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_guidance_changes_codes(model):
    """The guided branches are really used: other cfg values give other greedy codes."""
    codes = {}
    for uncond, cfg in (("none", 0.0), ("null_prompt", 4.0), ("release", 4.0)):
        (out,) = generate(
            model, "Draw", sampling=dict(uncond=uncond, cfg=cfg, top_k=1, max_new_tokens=1), force_image=True
        )
        codes[uncond] = torch.cat(out.image_codes[0])
    assert not torch.equal(codes["none"], codes["null_prompt"])
    assert not torch.equal(codes["none"], codes["release"])


# --------------------------------------------------------------------------------------------- teacher forcing
def test_forced_codes_reproduce_teacher_forced_logits(model, tokenizer):
    """Forcing the sampled codes to a known image's codes gives the logits of the training forward."""
    torch.manual_seed(5)
    R = model.cfg.vqvae.image_size
    img = torch.rand(1, 3, R, R) * 2 - 1
    codes = model.vae_local.img_to_codes(img)
    sampling = SamplingConfig(uncond="none", max_new_tokens=1)
    (out,) = generate(
        model, "Draw a red circle", sampling=sampling, force_image=True, image_codes=[codes], return_image_logits=True
    )
    assert all(torch.equal(a, b[0]) for a, b in zip(out.image_codes[0], codes, strict=True))
    inference_LV = torch.cat(out.image_logits[0])

    # The training forward on prompt + start + L pads + end, in eval mode (no label dropout, no DropPath).
    ids = model.ids
    prompt = tokenize_conversation(
        [{"role": "user", "content": "Draw a red circle"}],
        tokenizer,
        ids,
        model.num_image_tokens,
        model.num_gen_tokens,
        add_generation_prompt=True,
    ).input_ids
    input_ids = torch.tensor([prompt + [ids.gen_start] + [ids.gen_pad] * model.num_gen_tokens + [ids.gen_end]])
    labels = torch.full_like(input_ids, -100)
    labels[0, -1] = ids.gen_end
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_gen_values": img,
    }
    with torch.no_grad():
        x_BLC, cond_BD = model.gen_inputs(model.gen_targets(batch))
        embeds = model.build_inputs_embeds(input_ids, None, model.image_gen_projector(x_BLC))
        hidden = model.llm_hidden(embeds, batch["attention_mask"])
        train_LV = model.decode_image_logits(hidden[input_ids == ids.gen_pad][None], cond_BD)[0]
        loss_image = model(batch).loss_image
    torch.testing.assert_close(inference_LV, train_LV, atol=2e-4, rtol=1e-4)
    ce = torch.nn.functional.cross_entropy(inference_LV, torch.cat(codes, dim=1)[0])
    torch.testing.assert_close(ce, loss_image, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- call counts
@pytest.mark.parametrize("uncond", ["release", "null_prompt", "none"])
def test_one_llm_and_one_var_forward_per_scale(model, uncond):
    llm_calls, var_calls = [], []
    hooks = [
        model.language_model.model.register_forward_hook(lambda m, a, kw, out: llm_calls.append(1), with_kwargs=True),
        model.vargpt_gen.head.register_forward_hook(lambda m, a, out: var_calls.append(1)),
    ]
    stats = GenerationStats()
    try:
        outs = generate(model, PROMPTS, sampling=dict(max_new_tokens=1, uncond=uncond), force_image=True, stats=stats)
    finally:
        for h in hooks:
            h.remove()
    K = model.vargpt_gen.schedule.num_scales
    prefills = 2 if uncond == "null_prompt" else 1  # the null prompt is prefilled once per call
    assert all(len(o.images) == 1 for o in outs)
    assert len(llm_calls) == prefills + K  # one batched image group: K forwards for 3 images
    assert len(var_calls) == K
    assert (stats.llm_image_calls, stats.var_calls, stats.llm_text_calls, stats.images) == (K, K, 0, 3)


# --------------------------------------------------------------------------------------------- replies
def test_text_image_text_round_trip(model, tokenizer):
    """A reply with text, an image and more text; its layout is the training layout, and fed back as history
    (the image re-encoded) it tokenises to the same ids."""
    ids = model.ids
    proc = start_at({0: 2}, ids.gen_start, ids.eos, {0: 2 + 1 + model.num_gen_tokens + 1 + 3})
    (out,) = generate(model, "Draw a red circle", sampling=dict(max_new_tokens=20), logits_processor=proc)
    L = model.num_gen_tokens
    assert out.finish_reason == "eos"
    assert len(out.images) == 1 and out.images[0].size == (model.cfg.vqvae.image_size,) * 2
    assert out.image_tensors[0].shape == (3, model.cfg.vqvae.image_size, model.cfg.vqvae.image_size)
    t = out.token_ids
    assert t[2] == ids.gen_start and t[3 : 3 + L] == [ids.gen_pad] * L and t[3 + L] == ids.gen_end
    assert len(t) == 2 + 1 + L + 1 + 3 + 1 and t[-1] == ids.eos
    assert len(out.segments) == 2 and out.text == "<image_gen>".join(out.segments)
    assert out.segments[0] == tokenizer.decode(t[:2], skip_special_tokens=True)
    assert out.segments[1] == tokenizer.decode(t[4 + L : -1], skip_special_tokens=True)

    # Multi-turn: the reply (with its image as a generated-image placeholder) becomes history.
    history = [
        {"role": "user", "content": "Draw a red circle"},
        {"role": "assistant", "content": out.text},
        {"role": "user", "content": "Now a blue one"},
    ]
    (again,) = generate(
        model, [history], images=[[out.image_tensors[0] * 2 - 1]], sampling=dict(max_new_tokens=2), force_image=True
    )
    assert len(again.images) == 1


def test_max_new_tokens_stop_strings_and_image_budget(model, tokenizer):
    ids = model.ids
    (plain,) = generate(model, "Describe the image.", sampling=dict(max_new_tokens=12))
    assert plain.finish_reason == "length" and len(plain.token_ids) == 12 and plain.images == []

    text = plain.text
    stop = text[4:6]
    assert stop.strip() and len(stop) == 2
    (stopped,) = generate(model, "Describe the image.", sampling=dict(max_new_tokens=12, stop=[stop, "zzzz"]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.find(stop)]

    def always_start(samples, reply_ids, logits):
        logits = logits.clone()
        logits[:, ids.gen_start] += 1e4
        return logits

    for budget in (0, 2):
        (out,) = generate(
            model, "Draw", sampling=dict(max_new_tokens=6, max_images=budget, top_k=1), logits_processor=always_start
        )
        assert len(out.images) == budget == out.token_ids.count(ids.gen_start)
        assert out.finish_reason == "length"
        steps = len(out.token_ids) - budget * (model.num_gen_tokens + 1)  # gen_end is not a step
        assert steps == 6


def test_understanding_image_changes_the_answer(model):
    S = model.cfg.vision.image_size
    red = Image.new("RGB", (S * 2, S * 2), (255, 0, 0))
    blue = Image.new("RGB", (S, S), (0, 0, 255))
    outs = generate(
        model,
        ["<image>\nWhat colour is it?", "<image>\nWhat colour is it?"],
        images=[[red], [blue]],
        sampling=dict(max_new_tokens=4),
    )
    assert outs[0].token_ids != outs[1].token_ids or outs[0].text != outs[1].text


# --------------------------------------------------------------------------------------------- prompt formats
# The release's system prompt, written out (not imported) so that a drift of the shared constant shows here.
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)


@pytest.fixture(scope="module")
def llama_model():
    """The tiny model with the Llama-style (whitespace-sensitive, BOS-adding) tokenizer."""
    torch.manual_seed(0)
    return build_vargpt(load_model_config(CONF / "tiny.yaml"), llama_style_tokenizer()).eval()


def test_evaluation_format_is_one_string_with_bos(llama_model):
    """lmms-eval's prompt: the Vicuna string, the image tokens expanded in it, one tokenizer call with BOS; the
    training format stays element-wise without BOS. A tokenizer's own chat template replaces the Vicuna one."""
    tok, n = llama_model.tokenizer, llama_model.num_image_tokens
    red, blue = Image.new("RGB", (9, 7), "red"), Image.new("RGB", (5, 8), "blue")
    question = "<image> <image>\nWhat is in the image?"
    (out,) = generate(llama_model, question, [red, blue], sampling=dict(max_new_tokens=1), prompt_format="evaluation")
    image = "<image>" * n
    expected = tok(f"{SYSTEM} USER: {image} {image}\nWhat is in the image? ASSISTANT:")["input_ids"]
    assert out.prompt_ids == expected and expected[0] == tok.bos_token_id
    (train,) = generate(llama_model, question, [red, blue], sampling=dict(max_new_tokens=1))
    assert train.prompt_ids[0] != tok.bos_token_id and train.prompt_ids.count(llama_model.ids.image) == 2 * n

    templated = copy.deepcopy(tok)
    templated.chat_template = "{% for m in messages %}[Q] {{ m['content'] }}{% endfor %}[A]"
    (own,) = generate(
        llama_model, "<image>\nWhat?", [red], sampling=dict(max_new_tokens=1), prompt_format="evaluation",
        tokenizer=templated,
    )  # fmt: skip
    assert own.prompt_ids == tok(f"[Q] {image}\nWhat?[A]")["input_ids"]


def test_evaluation_format_refuses_what_it_cannot_express(llama_model):
    img = Image.new("RGB", (4, 4))
    two_turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello <image_gen>"},
                 {"role": "user", "content": "<image>\nAnd now?"}]  # fmt: skip
    with pytest.raises(ValueError, match=r"conversation 0: .*one user turn.*\['user', 'assistant', 'user'\]"):
        generate(llama_model, [two_turns], [[torch.zeros(3, 64, 64), img]], prompt_format="evaluation")
    with pytest.raises(ValueError, match=r"64 image tokens \(64 expected.*and 1 image-generation tokens"):
        generate(llama_model, "<image><|image_gen_start|>", [img], prompt_format="evaluation")
    with pytest.raises(ValueError, match="prompt_format='lmms'"):
        generate(llama_model, "Hi", prompt_format="lmms")


def test_past_max_positions_runs_a_prompt_longer_than_the_llm(model):
    """9 images x 64 tokens > the tiny LLM's 512 positions: refused by default; run (and not cut at the limit)
    with past_max_positions, as transformers' generate and so lmms-eval run it."""
    limit = model.cfg.llm.max_position_embeddings
    images = [Image.new("RGB", (8, 8), "red")] * 9
    prompt = "<image>" * 9 + "How many?"
    with pytest.raises(ValueError, match=f"the LLM holds {limit} positions.*past_max_positions=True"):
        generate(model, prompt, images, sampling=dict(max_new_tokens=3))
    (out,) = generate(model, prompt, images, sampling=dict(max_new_tokens=3), past_max_positions=True)
    assert len(out.prompt_ids) > limit
    assert len(out.token_ids) == 3 or out.finish_reason == "eos"


# --------------------------------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors(model):
    S = model.cfg.vision.image_size
    img = Image.new("RGB", (S, S))
    with pytest.raises(ValueError, match="1 image\\(s\\) were given"):
        generate(model, "What colour is it?", images=[img])
    with pytest.raises(ValueError, match="2 image\\(s\\) were given"):
        generate(model, "<image> What colour is it?", images=[img, img])
    with pytest.raises(ValueError, match="but 0 image"):
        generate(model, "<image> What colour is it?")
    with pytest.raises(ValueError, match=f"\\(3, {S}, {S}\\)"):
        generate(model, "<image> What colour?", images=[torch.zeros(3, S + 1, S)])
    R = model.cfg.vqvae.image_size
    earlier = [
        {"role": "user", "content": "Draw a circle."},
        {"role": "assistant", "content": "Here.<image_gen>"},
        {"role": "user", "content": "Again."},
    ]
    with pytest.raises(
        ValueError, match=f"'<image_gen>' image tensor must be float \\(3, {R}, {R}\\).*got \\(3, {R + 1}"
    ):
        generate(model, [earlier], images=[[torch.zeros(3, R + 1, R)]])
    with pytest.raises(ValueError, match="mode is 'L'"):
        generate(model, "<image> What colour?", images=[Image.new("L", (S, S))])
    with pytest.raises(ValueError, match="empty"):
        generate(model, "   ")
    with pytest.raises(ValueError, match="no conversations"):
        generate(model, [])
    with pytest.raises(ValueError, match="conversation 1 is invalid"):
        generate(model, ["hi", []])
    with pytest.raises(ValueError, match="last turn must be the user's"):
        generate(model, [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]])
    with pytest.raises(ValueError, match="unknown key"):
        generate(model, "hi", sampling={"tempreature": 0.5})
    with pytest.raises(ValueError, match="uncond must be one of"):
        generate(model, "hi", sampling={"uncond": "noise"})
    with pytest.raises(ValueError, match="max_images is 0"):
        generate(model, "hi", sampling={"max_images": 0}, force_image=True)


def test_sampled_text_is_seeded_and_mode_is_restored(model):
    model.train()
    try:
        s = dict(greedy=False, temperature=1.5, max_new_tokens=8, seed=3)
        a = generate(model, ["Describe the image."] * 2, sampling=s)
        b = generate(model, ["Describe the image."] * 2, sampling=s)
        assert model.training and model.vargpt_gen.training
    finally:
        model.eval()
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert a[0].token_ids != a[1].token_ids


# --------------------------------------------------------------------------------------------- CLI
ROOT = Path(__file__).resolve().parents[1]


def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_cli", ROOT / "src" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    register_configs()  # generate_schema
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("generate", overrides=overrides)


def test_sampling_presets_compose_and_validate():
    default = SamplingConfig.coerce(_compose([]).sampling)
    assert default == SamplingConfig()  # the YAML defaults are the dataclass defaults (the release)
    assert (default.cfg, default.top_k, default.top_p, default.uncond, default.greedy) == (
        1.5,
        900,
        0.96,
        "release",
        True,
    )
    greedy = SamplingConfig.coerce(_compose(["sampling=greedy", "sampling.cfg=3"]).sampling)
    assert (greedy.top_k, greedy.top_p, greedy.cfg) == (1, 0.0, 3.0)


def test_cli_random_model_writes_pngs_and_manifest(tmp_path):
    import json

    cfg = _compose([f"out_dir={tmp_path}", "n=2", "sampling.max_new_tokens=2"])
    manifest = json.loads(_cli().run(cfg).read_text())
    assert manifest["prompt"] == "Draw a red circle" and manifest["force_image"] is True
    assert manifest["sampling"]["cfg"] == 1.5 and [s["seed"] for s in manifest["samples"]] == [0, 1]
    for sample in manifest["samples"]:
        assert sample["images"] and sample["text"].startswith("<image_gen>")
        for name in sample["images"]:
            assert Image.open(tmp_path / name).size == (64, 64)


@pytest.mark.parametrize("layout", ["state_dict", "released_folder"])
def test_cli_loads_checkpoints(model, tokenizer, tmp_path, layout):
    """A state-dict file (with the model config and a tokenizer folder) and an exported released-layout folder
    give the same images as the in-memory model."""
    import json

    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok_dir))
    if layout == "state_dict":
        ckpt = tmp_path / "model.pth"
        torch.save(model.state_dict(), ckpt)
        extra = [f"tokenizer={tok_dir}"]
    else:
        from vargpt.checkpoint import export_released

        ckpt = export_released(model, tmp_path / "export", dtype="fp32", tokenizer=tokenizer)
        extra = []
    out = tmp_path / "out"
    cfg = _compose([f"ckpt={ckpt}", f"out_dir={out}", "sampling=greedy", "sampling.max_new_tokens=3", *extra])
    manifest = json.loads(_cli().run(cfg).read_text())
    (ref,) = generate(model, "Draw a red circle", sampling=dict(top_k=1, top_p=0.0, max_new_tokens=3), force_image=True)
    assert manifest["samples"][0]["text"] == ref.text
    png = torch.tensor(list(Image.open(out / manifest["samples"][0]["images"][0]).getdata()))
    assert torch.equal(png, torch.tensor(list(ref.images[0].getdata())))


def test_bench_runs_and_counts_k_calls_per_image(capsys):
    import importlib

    bench = importlib.import_module("bench.generate")  # as ``python -m bench.generate`` runs it
    bench.main(["batch_sizes=1,2", "repeats=1", "warmup=0", "text_tokens=2", "threads=1"])
    out = capsys.readouterr().out
    assert out.count("\n    1  ") == 3 and out.count("\n    2  ") == 3  # three tables, two batch sizes each
    assert out.count(" 6/6 ") == 2  # one LLM and one VAR forward per scale, whatever the batch


def test_an_input_path_that_is_not_an_image_is_named(model, tmp_path):
    path = tmp_path / "notes.png"
    path.write_bytes(b"plain text, not pixels")
    with pytest.raises(ValueError, match=f"{path}: not an image PIL can read"):
        generate(model, ["<image>\nWhat is it?"], images=[[str(path)]])


@pytest.mark.parametrize("uncond", ["release", "null_prompt"])
def test_fast_paths_give_the_plain_paths_greedy_output(model, uncond):
    """The decoder's default fast paths (VQ-VAE decode, scale step, LLM masks) change no greedy token or code."""
    sampling = dict(max_new_tokens=6, uncond=uncond, top_k=1)
    forced = [True, False, True]

    def run(fast_paths):
        return generate(model, PROMPTS, sampling=sampling, force_image=forced, return_pil=False, fast_paths=fast_paths)

    plain, fast = run(FastPaths.plain()), run(None)
    for p, f in zip(plain, fast, strict=True):
        assert f.token_ids == p.token_ids
        assert len(f.image_codes) == len(p.image_codes)
        for codes_p, codes_f in zip(p.image_codes, f.image_codes, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(codes_p, codes_f, strict=True))
        for img_p, img_f in zip(p.image_tensors, f.image_tensors, strict=True):
            assert (img_f - img_p).abs().max().item() < 1e-4  # [0, 1] images: far inside 1/255
