"""Benchmark metrics other than VQA accuracy, as lmms-eval computes them.

Every function reproduces the lmms-eval task code the benchmark numbers come from (``tasks/<name>/utils.py``), so
scores stay comparable with VARGPT's paper and the usual leaderboards. Where lmms-eval is odd, the choice is stated in
the function's docstring: faithful by default when the oddity changes scores (with ``faithful=False`` for the
repaired variant where one exists), fixed when it does not. Per-item functions return 1.0 / 0.0; the aggregates of
:mod:`vargpt.eval.benchmarks` turn them into percentages.
"""

from __future__ import annotations

import logging
import random
import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

_ASCII_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


# --------------------------------------------------------------------------------------------- exact match (GQA)


def exact_match(prediction: str, reference: str, ignore_case: bool = True, ignore_punctuation: bool = True) -> float:
    """lmms-eval's ``exact_match`` metric (ported from HF ``evaluate``), as GQA configures it.

    ``ignore_case`` lowercases both sides; ``ignore_punctuation`` deletes ASCII ``string.punctuation`` from both.
    Surrounding whitespace is stripped: lmms-eval's model wrappers strip the decoded text before scoring, so this
    keeps the score independent of whether our generation loop does.
    """
    pred, ref = prediction.strip(), reference.strip()
    if ignore_case:
        pred, ref = pred.lower(), ref.lower()
    if ignore_punctuation:
        pred, ref = pred.translate(_ASCII_PUNCTUATION_TABLE), ref.translate(_ASCII_PUNCTUATION_TABLE)
    return float(pred == ref)


# ------------------------------------------------------------------------------------------ option-letter matches


def option_letters(count: int) -> list[str]:
    """The option letters "A", "B", ... of a multiple-choice question with ``count`` options."""
    return [chr(ord("A") + i) for i in range(count)]


def scienceqa_correct(prediction: str, target: str, faithful: bool = True) -> float:
    """ScienceQA-IMG: the stripped, lowercased prediction must equal the option letter.

    Quirk (changes scores): the LLaVA-style fallback for answers like "A. The cat" tests ``pred[0].isupper()`` after
    the prediction was lowercased, so it never fires and such answers count as wrong. Faithful by default;
    ``faithful=False`` applies the intended fallback (first character is the letter, second a period).
    """
    target_letter = target.strip().lower()
    if prediction.strip().lower() == target_letter:
        return 1.0
    if faithful:
        return 0.0
    raw = prediction.strip()
    return float(len(raw) >= 2 and raw[0].isupper() and raw[1] == "." and raw[0].lower() == target_letter)


def seedbench_correct(prediction: str, answer: str) -> float:
    """SEED-Bench: the first character of the stripped prediction must equal the answer letter, both lowercased
    and stripped (lmms-eval's ``seed_process_result`` and ``seed_aggregation_result``).

    Faithful; note that "The answer is A" therefore scores 0 (its first letter is "T"), while "a" scores 1.
    """
    return float(prediction.strip()[:1].lower() == answer.lower().strip())


def _count_tokens(tokens: Sequence[str], letters: str, prefix: str = "", suffix: str = "") -> int:
    """How many of ``letters`` occur as whole tokens ``prefix + letter + suffix``."""
    return sum(f"{prefix}{letter}{suffix}" in tokens for letter in letters)


# The (prefix, suffix) decorations MMBench's matcher accepts around an option letter, in its order of preference.
_MMBENCH_DECORATIONS = (
    ("", "."), ("", ","), ("", ":"), ("", ")"), ("", ")."), ("(", ")"),
    ("(", ")."), (":", ""), (":", ","), (":", "."), (":", ")"), (":", ")."),
)  # fmt: skip


def mmbench_extract_option(prediction: str, options: Mapping[str, str]) -> str | None:
    """The option letter MMBench's rule-based matcher (``MMBench_Evaluator.can_infer``) reads from a prediction.

    First a letter A-E standing alone as a token (unless "A" is a token of a longer answer, where it may be the
    article), then a letter decorated as "A." / "(A)" / ":A" ..., then a unique option text (``options`` maps the
    letters A-D to texts) contained in the prediction. ``None`` where lmms-eval would ask a GPT judge: we have none
    offline, so the caller counts that answer as wrong (the only deviation; with the "answer with the letter" prompt
    it concerns answers that name no letter and quote no option).
    """
    letters = "ABCDE"
    tokens = [token.strip() for token in prediction.split()]
    if _count_tokens(tokens, letters) == 1 and not ("A" in tokens and len(tokens) > 3):
        return next(letter for letter in letters if letter in tokens)
    for prefix, suffix in _MMBENCH_DECORATIONS:
        if _count_tokens(tokens, letters, prefix, suffix) == 1:
            return next(letter for letter in letters if f"{prefix}{letter}{suffix}" in tokens)
    lowered = prediction.lower()
    hits = [letter for letter, text in options.items() if letter in "ABCD" and str(text).lower() in lowered]
    return hits[0] if len(hits) == 1 else None


def mmbench_circular_accuracy(records: Iterable[tuple[int, str, str, Mapping[str, str]]]) -> tuple[float, int]:
    """MMBench accuracy with CircularEval, as ``MMBench_Evaluator.eval_result``: (fraction correct, #questions).

    ``records`` are ``(index, prediction, answer, options)``. Rows with ``index >= 1_000_000`` are option-rotated
    copies of question ``index % 1_000_000``; a question counts as correct only if it and every copy present are
    answered correctly. Only questions whose original row (``index < 1_000_000``) is present are scored.
    """
    groups: dict[int, list[bool]] = defaultdict(list)
    originals: set[int] = set()
    for index, prediction, answer, options in records:
        groups[index % 1_000_000].append(mmbench_extract_option(prediction, options) == answer)
        if index < 1_000_000:
            originals.add(index)
    if not originals:
        return 0.0, 0
    return sum(all(groups[index]) for index in originals) / len(originals), len(originals)


_MMMU_STRIP_CHARS = (",", ".", "!", "?", ";", ":", "'")


def mmmu_extract_option(response: str, options: Sequence[str], seed: str, faithful: bool = True) -> str | None:
    """The option letter MMMU's official parser (``parse_multi_choice_response``) reads from a response.

    Candidates, in order: "(A)"; "A " (a letter followed by a space, the response padded with spaces); "A."; for
    responses longer than 5 words, an option text contained in the response. Several candidates: the one occurring
    last wins. No candidate (changes scores): upstream picks a random letter with the global RNG, so scores depend on
    the evaluation order. Faithful in distribution but reproducible: ``faithful=True`` draws the letter from an RNG
    seeded with ``seed`` (the question id); ``faithful=False`` returns ``None`` (counted wrong).
    """
    letters = option_letters(len(options))
    for char in _MMMU_STRIP_CHARS:
        response = response.strip(char)
    response = f" {response} "
    candidates = [letter for letter in letters if f"({letter})" in response]
    bracketed = bool(candidates)
    if not candidates:
        candidates = [letter for letter in letters if f"{letter} " in response]
    if not candidates:
        candidates = [letter for letter in letters if f"{letter}." in response]
    by_text = False
    if not candidates and len(response.split()) > 5:
        candidates = [letter for letter, text in zip(letters, options, strict=True) if text.lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return random.Random(seed).choice(letters) if faithful and letters else None
    if len(candidates) == 1:
        return candidates[0]
    if by_text:
        positions = [response.lower().rfind(options[letters.index(c)].lower()) for c in candidates]
    elif bracketed:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))]


def _mmmu_is_number(text: str) -> bool:
    """Whether ``float`` accepts the text once commas are removed (MMMU's ``check_is_number``)."""
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


def _mmmu_normalize(text: str) -> list[str | float]:
    """MMMU's ``normalize_str``: numbers become floats rounded to 2 decimals, strings are lowercased, and a single
    character is padded with a space on either side to avoid trivial substring matches."""
    text = text.strip()
    if _mmmu_is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [f" {text}", f"{text} "] if len(text) == 1 else [text]


_MMMU_NUMBER_PATTERNS = (
    re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b"),  # with thousands separators
    re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+"),  # scientific notation
    re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])"),  # plain
)
_MMMU_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_MMMU_TRIVIAL = frozenset(":,.!?;'")


def _mmmu_key_subresponses(response: str) -> list[str]:
    """The tails after the last answer indicator ("is ", "so ", ...) of each sentence, shortest per sentence."""
    response = response.strip().strip(".").lower()
    # Upstream lowercases before splitting, so the capital-letter look-ahead never matches: only newlines split.
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, sentence in enumerate(sentences):
        # Only the last sentence may be a bare equation.
        indicators = _MMMU_KEY_INDICATORS + (("=",) if i == len(sentences) - 1 else ())
        shortest = ""
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                # Upstream's `if not shortest` lets any tail replace an empty one, even a longer tail.
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _MMMU_TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def mmmu_parse_open(response: str) -> list[str | float]:
    """MMMU's ``parse_open_response``: candidate answers (strings and numbers) extracted from a free-form response."""
    keys = _mmmu_key_subresponses(response)
    candidates = list(keys)
    for key in keys:
        for pattern in _MMMU_NUMBER_PATTERNS:
            candidates.extend(pattern.findall(key))
    return list({value for candidate in candidates for value in _mmmu_normalize(candidate)})


def mmmu_open_correct(answer: str, parsed: Sequence[str | float]) -> float:
    """MMMU's ``eval_open``: a parsed number equals a normalised gold number, or a gold string occurs in a parsed
    string."""
    golds = _mmmu_normalize(answer)
    for pred in parsed:
        if isinstance(pred, str):
            if any(isinstance(gold, str) and gold in pred for gold in golds):
                return 1.0
        elif pred in golds:
            return 1.0
    return 0.0


# --------------------------------------------------------------------------------------------------------- POPE


POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")
PREDICTED_YES_RATIO = "predicted_yes_ratio"


def pope_metrics(predictions: Sequence[str], answers: Sequence[str]) -> dict[str, float]:
    """POPE's metrics (all in [0, 1]) under lmms-eval's names and with its meanings, plus one of our own.

    A prediction counts only if ``pred.lower().strip()`` is exactly "yes" or "no" ("Yes." is wrong). Faithful
    quirks: an answer that is neither counts as wrong for accuracy but is neither a false positive nor a false
    negative, so it does not lower precision or recall. Precision/recall/F1 with a zero denominator are 0, and so is
    every metric of an empty input.

    ``pope_accuracy``, ``pope_precision``, ``pope_recall``, ``pope_f1_score`` and ``pope_yes_ratio`` are lmms-eval's:
    ``pope_yes_ratio`` is the share of "yes" in the *ground truth* (0.5 on the POPE files). Ours,
    ``predicted_yes_ratio``, is the share of *predictions* that are "yes", the POPE paper's bias indicator.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    preds = [p.lower().strip() for p in predictions]
    gts = [a.lower().strip() for a in answers]
    if bad := sorted({gt for gt in gts if gt not in ("yes", "no")}):
        raise ValueError(f"POPE answers must be yes or no, got {bad}")
    n = len(gts)
    if n == 0:
        return dict.fromkeys((*POPE_METRICS, PREDICTED_YES_RATIO), 0.0)
    pairs = list(zip(preds, gts, strict=True))
    tp = sum(p == "yes" and g == "yes" for p, g in pairs)
    fp = sum(p == "yes" and g == "no" for p, g in pairs)
    fn = sum(p == "no" and g == "yes" for p, g in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "pope_accuracy": sum(p == g for p, g in pairs) / n,
        "pope_precision": precision,
        "pope_recall": recall,
        "pope_f1_score": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "pope_yes_ratio": gts.count("yes") / n,
        PREDICTED_YES_RATIO: preds.count("yes") / n,
    }


# ---------------------------------------------------------------------------------------------------------- MME

MME_PERCEPTION = (
    "existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR",
)  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_parse_yes_no(prediction: str) -> str:
    """MME's answer parser (from Otter): "yes", "no" or "other".

    Periods are removed and the text lowercased; a bare "y"/"n" counts; otherwise "yes" and then "no" are searched
    in the first 4 characters only (so "Not sure" and "None" read as "no", "Yes, ..." as "yes"). Faithful.
    """
    pred = prediction.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    head = pred[:4]
    if "yes" in head:
        return "yes"
    return "no" if "no" in head else "other"


def mme_scores(records: Iterable[tuple[str, str, str, str]]) -> dict[str, float]:
    """MME scores from ``(question_id, category, prediction, answer)`` records.

    Each image (``question_id``) has two yes/no questions. Per category: ``acc`` = % of questions right, ``acc_plus``
    = % of images with both right, ``score`` = ``acc + acc_plus`` (at most 200). ``perception`` / ``cognition`` sum
    the scores of the categories present (at most 2000 / 800); a category outside the 10 perception ones counts as
    cognition, as upstream. An image with more than two questions is a data error (upstream asserts); one with a
    single question (a truncated run, e.g. ``limit``) is left out with a warning instead of failing.
    """
    by_category: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for question_id, category, prediction, answer in records:
        gold = answer.lower().strip().replace(".", "")
        if gold not in ("yes", "no"):
            raise ValueError(f"MME answer for {question_id!r} must be yes or no, got {answer!r}")
        by_category[category][question_id].append(mme_parse_yes_no(prediction) == gold)
    scores: dict[str, float] = {"perception": 0.0, "cognition": 0.0}
    for category, images in sorted(by_category.items()):
        if oversized := [qid for qid, hits in images.items() if len(hits) > 2]:
            raise ValueError(f"MME scores question pairs; images {oversized[:3]} have more than two questions")
        pairs = [hits for hits in images.values() if len(hits) == 2]
        if len(pairs) < len(images):
            logger.warning("MME %s: %d image(s) with one question left out", category, len(images) - len(pairs))
        if not pairs:
            continue
        acc = 100.0 * sum(sum(hits) for hits in pairs) / (2 * len(pairs))
        acc_plus = 100.0 * sum(all(hits) for hits in pairs) / len(pairs)
        scores[f"{category}/acc"] = acc
        scores[f"{category}/acc_plus"] = acc_plus
        scores[f"{category}/score"] = acc + acc_plus
        scores["perception" if category in MME_PERCEPTION else "cognition"] += acc + acc_plus
    return scores
