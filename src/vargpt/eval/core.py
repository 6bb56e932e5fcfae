"""The one evaluation core: how a model answers questions and draws images, for every evaluation path.

``src/eval.py`` (:mod:`vargpt.eval.runner`), the training callback (:mod:`vargpt.eval.callbacks`) and the
in-memory shapes evaluation (:func:`vargpt.eval.shapes_eval.evaluate_shapes`) all call :func:`answer` and
:func:`draw`, so a record (and hence every figure) is made the same way whoever asks.

* :func:`answer`: batches of questions to prediction records. How a question is put to the model and turned
  into a record is a :class:`Questions`: :data:`BENCHMARK_QUESTIONS` asks as lmms-eval's VARGPT wrapper asks
  (docs/evaluation.md): the task's prompt with ``<image>`` tokens put first (:func:`evaluation_context`), one
  string in the Vicuna v1 template with the system prompt (or the tokenizer's own chat template), BOS, prompts
  past the LLM's position limit run, the answer after the last marker (:func:`extract_answer`);
  :data:`CHAT_QUESTIONS` asks the shapes world's questions in the training chat template its model learnt.
* :func:`draw`: batches of drawing instructions to (record, image or None); instruction ``i`` is drawn with the
  seed ``sampling.seed + i`` whatever the batching. A shapes instruction is judged (:func:`t2i_verdict`); a reply
  without an image gets every judged attribute wrong (:func:`no_image_verdict`), on every path.
* ``lockstep=True`` (a sharded model under FSDP, where every forward is a collective): every rank makes the same
  forward calls. :func:`rank_share` gives every rank as many items (padded with repeats), answers run for
  exactly ``max_new_tokens`` steps with end-of-sequence masked (:class:`EOSRecorder`), each cut where the model
  would have ended it, and images are forced at the start of each reply (``max_new_tokens=1``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vargpt.data.chat import SYSTEM_PROMPT
from vargpt.eval.benchmark_items import BenchmarkItem
from vargpt.eval.judge import ShapesJudge, Verdict
from vargpt.eval.vqa import normalize_answer
from vargpt.inference import generate
from vargpt.model.sampling_config import SamplingConfig
from vargpt.tokens import IMAGE_PLACEHOLDER

log = logging.getLogger(__name__)

# The answer markers lmms-eval's LLaVA-style wrappers split the decoded output at, by chat template.
ANSWER_MARKERS = ("ASSISTANT:", "<|assistant|>", "[/INST]")
# The attributes the judge rates on every image, and those it rates only when the instruction asked for them.
ALWAYS_JUDGED = ("colour", "shape", "both", "count")
JUDGED_WHEN_ASKED = ("size", "position", "background")


def batched(items: Iterable[Any], batch_size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most ``batch_size`` items, read lazily (benchmark items stream from parquet)."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, max(1, batch_size))):
        yield batch


def rank_share(items: Sequence[Any], rank: int, world: int) -> list[tuple[int, Any]]:
    """This rank's ``(index, item)`` pairs: round-robin, padded with repeats (index -1) so that every rank has
    as many (the same batches, hence the same forward calls, on every rank)."""
    if not items:
        return []
    per_rank = -(-len(items) // world)
    indices = [rank + world * k for k in range(per_rank)]
    return [(i if i < len(items) else -1, items[i % len(items)]) for i in indices]


# ------------------------------------------------------------------------------------------------ prompts
def evaluation_context(item: BenchmarkItem) -> str:
    """lmms-eval's context for the model (VARGPT wrapper): the task's prompt, with one ``<image>`` per visual,
    space-separated, and a newline put first when the prompt holds none (it never does in our ten tasks; MMMU's
    ``<image 1>`` is not one)."""
    if IMAGE_PLACEHOLDER in item.prompt:
        return item.prompt
    return " ".join([IMAGE_PLACEHOLDER] * len(item.images)) + "\n" + item.prompt


def answer_marker(tokenizer: Any) -> str:
    """The marker the wrapper splits its decoded output at: the first of :data:`ANSWER_MARKERS` in the chat
    template in use (the tokenizer's, else the Vicuna template, which holds ``ASSISTANT:``)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    return next((marker for marker in ANSWER_MARKERS if marker in template), ANSWER_MARKERS[0])


def extract_answer(reply: str, marker: str) -> str:
    """The wrapper's answer: the text after the last ``marker``, stripped. Its decoded output holds the prompt,
    which ends with the marker, so a reply without one is kept whole."""
    return reply.split(marker)[-1].strip()


def evaluation_prompt_settings(model: Any) -> dict[str, Any]:
    """The prompt settings :data:`BENCHMARK_QUESTIONS` uses with this model's tokenizer (in ``run.json``)."""
    template = getattr(model.tokenizer, "chat_template", None)
    return {
        "format": "evaluation",
        "template": template or "vicuna_v1",
        "system": None if template else SYSTEM_PROMPT,
        "answer_marker": answer_marker(model.tokenizer),
        "past_max_positions": True,
    }


def answer_items(
    model: Any, items: Sequence[BenchmarkItem], sampling: SamplingConfig, logits_processor: Any = None
) -> list[Any]:
    """The model's replies (``GenerationOutput`` s) to benchmark questions, asked as lmms-eval's VARGPT wrapper
    asks them (see the module docstring); take the answers with :func:`extract_answer`."""
    return generate(
        model,
        [evaluation_context(item) for item in items],
        [item.images for item in items],
        sampling=sampling,
        prompt_format="evaluation",
        past_max_positions=True,
        logits_processor=logits_processor,
    )


# ------------------------------------------------------------------------------------------------ answering
class EOSRecorder:
    """Fixed-length decoding (lockstep): masks end-of-sequence and remembers, per sample, the step at which
    greedy decoding would have ended the reply."""

    def __init__(self, eos: int, n: int) -> None:
        self.eos = eos
        self.ends: list[int | None] = [None] * n

    def __call__(self, samples: list[int], reply_ids: list[list[int]], logits: torch.Tensor) -> torch.Tensor:
        wants_eos = (logits.argmax(-1) == self.eos).tolist()
        for row, sample in enumerate(samples):
            if wants_eos[row] and self.ends[sample] is None:
                self.ends[sample] = len(reply_ids[row])
        logits = logits.clone()
        logits[:, self.eos] = float("-inf")
        return logits


@dataclass(frozen=True)
class Reply:
    """One generated answer: its text and its prompt and answer lengths in tokens."""

    text: str
    prompt_tokens: int
    answer_tokens: int


@dataclass(frozen=True)
class Questions:
    """How a kind of question is put to the model and how its reply becomes a prediction record.

    Attributes:
        ask: ``(model, items, sampling, logits_processor) -> GenerationOutput`` s of one batch.
        record: ``(model, item, reply) -> record``.
        failed: ``(item, error message) -> record`` of an item whose generation raised.
    """

    ask: Callable[[Any, Sequence[Any], SamplingConfig, Any], list[Any]]
    record: Callable[[Any, Any, Reply], dict[str, Any]]
    failed: Callable[[Any, str], dict[str, Any]]


def _benchmark_record(model: Any, item: BenchmarkItem, reply: Reply) -> dict[str, Any]:
    """The answer after the last marker, with the prompt and answer lengths and whether they ran past the LLM's
    position limit (such prompts are run, as in lmms-eval, and counted)."""
    limit = int(model.cfg.llm.max_position_embeddings)
    return {
        **item.record(extract_answer(reply.text, answer_marker(model.tokenizer))),
        "prompt_tokens": reply.prompt_tokens,
        "answer_tokens": reply.answer_tokens,
        "over_position_limit": reply.prompt_tokens + reply.answer_tokens > limit,
    }


def _chat_ask(model: Any, items: Sequence[Any], sampling: SamplingConfig, logits_processor: Any) -> list[Any]:
    """The shapes world's questions (user turn with ``<image>``) in the model's training chat template."""
    prompts, images = [item.prompt for item in items], [item.images for item in items]
    return generate(model, prompts, images, sampling=sampling, logits_processor=logits_processor)


def _chat_record(model: Any, item: Any, reply: Reply) -> dict[str, Any]:
    """The stripped reply, right (1.0) when the VQA normaliser makes it equal to the answer."""
    prediction = reply.text.strip()
    return item.record(
        prediction=prediction, correct=float(normalize_answer(prediction) == normalize_answer(item.answer or ""))
    )


BENCHMARK_QUESTIONS = Questions(
    answer_items, _benchmark_record, lambda item, error: {**item.record(""), "error": error}
)
CHAT_QUESTIONS = Questions(
    _chat_ask, _chat_record, lambda item, error: item.record(prediction="", correct=0.0, error=error)
)


def _replies(model: Any, outputs: Sequence[Any], recorder: EOSRecorder | None) -> list[Reply]:
    """The replies of a batch; under lockstep each cut where greedy decoding would have ended it."""
    replies = []
    for j, out in enumerate(outputs):
        if recorder is None:
            replies.append(Reply(out.text, len(out.prompt_ids), len(out.token_ids)))
            continue
        token_ids = out.token_ids[: recorder.ends[j]]
        text = model.tokenizer.decode(token_ids, skip_special_tokens=True)
        replies.append(Reply(text, len(out.prompt_ids), len(token_ids)))
    return replies


def _answer_batch(
    model: Any, items: Sequence[Any], questions: Questions, sampling: SamplingConfig, lockstep: bool, retry: bool
) -> list[dict[str, Any]]:
    """Records of one batch; with ``retry``, a batch that raises is answered item by item and an item that still
    raises gets its ``failed`` record (never under lockstep: the other ranks would wait in a collective)."""
    recorder = EOSRecorder(model.ids.eos, len(items)) if lockstep else None
    try:
        outputs = questions.ask(model, items, sampling, recorder)
    except ValueError as exc:
        if not retry:
            raise
        if len(items) > 1:
            return [r for item in items for r in _answer_batch(model, [item], questions, sampling, lockstep, retry)]
        log.warning("item %s failed: %s", getattr(items[0], "id", items[0]), exc)
        return [questions.failed(items[0], str(exc))]
    replies = _replies(model, outputs, recorder)
    return [questions.record(model, item, reply) for item, reply in zip(items, replies, strict=True)]


def answer(
    model: Any,
    items: Iterable[Any],
    questions: Questions,
    sampling: SamplingConfig,
    batch_size: int,
    *,
    lockstep: bool = False,
    retry: bool = False,
) -> Iterator[list[dict[str, Any]]]:
    """Prediction records of questions, one list per batch of ``batch_size`` (see the module docstring)."""
    for batch in batched(items, batch_size):
        yield _answer_batch(model, batch, questions, sampling, lockstep, retry and not lockstep)


# ------------------------------------------------------------------------------------------------ drawing
@dataclass(frozen=True)
class PromptItem:
    """A free drawing instruction (not the shapes world's): nothing to judge it on."""

    index: int  # position in its list (seeds its generation)
    prompt: str
    scene: None = None
    requested: list[str] = field(default_factory=list)

    def record(self, **values: Any) -> dict[str, Any]:
        """The JSON-serialisable record."""
        return {"prompt": self.prompt, **values}


def matched_attributes(verdict: Verdict) -> list[dict[str, str] | None]:
    """Per asked object, the colour, shape, size and position of the drawn object it was judged on (JSON)."""
    return [
        None if obj is None else {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "position": obj.position}
        for obj in verdict.matched
    ]


def reply_names_objects(reply: str, scene: Mapping[str, Any]) -> bool:
    """Whether the reply's text names every object of the scene as "<colour> <shape>"."""
    return all(f"{obj['colour']} {obj['shape']}" in reply for obj in scene["objects"])


def no_image_verdict(requested: Sequence[str]) -> dict[str, float]:
    """The verdict on a reply without an image: every attribute the judge would have rated is wrong."""
    return dict.fromkeys((*ALWAYS_JUDGED, *(a for a in JUDGED_WHEN_ASKED if a in requested)), 0.0)


def t2i_verdict(item: Any, image: Image.Image | None, judge: ShapesJudge) -> dict[str, Any]:
    """The judge's 0 / 1 scores of a shapes instruction's image and, per asked object, the drawn object it was
    compared with (``matched``; None: not drawn)."""
    if image is None:
        return {"matched": [None] * len(item.scene["objects"]), **no_image_verdict(item.requested)}
    judged = judge.judge(image, item.scene, item.requested)
    return {"matched": matched_attributes(judged), **judged.scores()}


def _draw_record(item: Any, out: Any, image: Image.Image | None, judge: ShapesJudge | None) -> dict[str, Any]:
    """The record of one drawing: reply, seed, ``has_image``; for a shapes instruction also ``reply_objects``
    and, with a judge, its verdict."""
    values: dict[str, Any] = {"reply": out.text, "seed": out.seed, "has_image": float(image is not None)}
    if item.scene is not None:
        values["reply_objects"] = float(reply_names_objects(out.text, item.scene))
        if judge is not None:
            values.update(t2i_verdict(item, image, judge))
    return item.record(**values)


def draw(
    model: Any,
    items: Iterable[Any],
    sampling: SamplingConfig | Mapping[str, Any] | None,
    batch_size: int,
    *,
    judge: ShapesJudge | None = None,
    force_image: bool = False,
    lockstep: bool = False,
) -> Iterator[list[tuple[dict[str, Any], Image.Image | None]]]:
    """(record, image or None) per instruction (shapes items or :class:`PromptItem` s), one list per batch.

    ``sampling`` defaults to the release's; at least one image is allowed. Shapes instructions are judged when a
    ``judge`` is given. Under ``lockstep`` each reply starts with its image, with ``max_new_tokens=1``.
    """
    cfg = SamplingConfig.coerce(sampling, max_new_tokens=1) if lockstep else SamplingConfig.coerce(sampling)
    if cfg.max_images < 1:
        cfg = SamplingConfig.coerce(cfg, max_images=1)
    for batch in batched(items, batch_size):
        outputs = generate(
            model,
            [item.prompt for item in batch],
            sampling=cfg,
            force_image=force_image or lockstep,
            seeds=[cfg.seed + item.index for item in batch],
        )
        drawn = []
        for item, out in zip(batch, outputs, strict=True):
            image = out.images[0] if out.images else None
            drawn.append((_draw_record(item, out, image, judge), image))
        yield drawn
