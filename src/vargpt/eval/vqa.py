"""VQA accuracy as the official VQA / EvalAI evaluation and lmms-eval compute it.

The answer normaliser reproduces lmms-eval's ``EvalAIAnswerProcessor`` (itself the official VQA evaluation's
``processPunctuation`` / ``processDigitArticle`` plus EvalAI's ``word_tokenize``), including the quirks that change
scores, because the numbers we compare against (VARGPT's paper, LLaVA, lmms-eval leaderboards) were produced with it:

* the period regex ``(?!<=\\d)(\\.)(?!\\d)`` has a malformed look-behind (``(?!<=`` is a negative look-*ahead* for the
  text "<=digit", always true in front of a period), so every period not followed by a digit is removed ("2." -> "2");
* ``re.UNICODE`` is passed as ``re.sub``'s ``count`` argument, so at most 32 periods are removed;
* a digit-comma-digit anywhere in the text makes *every* listed punctuation mark be deleted instead of spaced out;
* the capitalised contraction keys ("Im", "Ive", "Id've") can never match the lowercased words.

One quirk does not change scores and is fixed: lmms-eval maps number words with ``NUMBER_MAP.setdefault``, which adds
every word it ever sees to a class-level dict (an unbounded memory leak); we use ``dict.get``.

Two accuracy schemes exist in lmms-eval, both leave-one-out ``mean_i min(1, #matches among the other answers / 3)``:

* ``"evalai"`` (TextVQA, VizWiz-VQA): the prediction and every human answer go through the full normaliser. This is
  the default of :func:`vqa_accuracy` because it is the symmetric, documented form of the metric.
* ``"vqav2"`` (VQAv2, as the official VQA evaluation): the prediction goes through the full normaliser; only when the
  human answers are not all identical do they (and the prediction, again) get punctuation and digit/article
  processing - never the lowercasing / "'s" splitting of the first step. So with 10 identical answers "Two" no
  prediction can score, and a possessive ("man's" -> "man 's") never matches disagreeing human answers. Faithful,
  because it changes scores; :func:`vargpt.eval.benchmarks.score` uses it for VQAv2.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

VQAScheme = Literal["evalai", "vqav2"]

# fmt: off
# The contraction table of the official VQA evaluation (keys are the forms without apostrophes).
_CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}

_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
# fmt: on

_ARTICLES = frozenset({"a", "an", "the"})

# The marks the official evaluation handles here (periods have their own rule, apostrophes are kept).
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')

# What lmms-eval's malformed `(?!<=\d)(\.)(?!\d)` actually matches: any period not followed by a digit.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# lmms-eval calls `PERIOD_STRIP.sub("", text, re.UNICODE)`: re.UNICODE (== 32) lands in the `count` argument.
_MAX_PERIODS_REMOVED = int(re.UNICODE)
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")


def process_punctuation(text: str) -> str:
    """Delete or space out punctuation as the official VQA evaluation does, then drop periods (see module doc).

    A mark is deleted when it touches a space somewhere in the text, or when the text contains a digit-comma-digit
    pattern; otherwise every occurrence is replaced by a space ("black-and-white" -> "black and white").
    """
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # The adjacency test looks at the original text, the replacement at the running result, as upstream does.
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_MAX_PERIODS_REMOVED)


def process_digit_article(text: str) -> str:
    """Lowercase, map number words "none"/"zero".."ten" to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_answer(text: str) -> str:
    """Normalise an answer exactly as lmms-eval's ``EvalAIAnswerProcessor`` (e.g. "Two dogs." -> "2 dogs").

    Steps: lowercase, remove "," and "?", split "'s" off as " 's", turn newlines/tabs into spaces, then
    :func:`process_punctuation` and :func:`process_digit_article`.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def _vqav2_strip(answer: str) -> str:
    """The whitespace clean-up VQAv2 applies to every answer before comparing."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str], scheme: VQAScheme = "evalai") -> float:
    """VQA accuracy of one prediction against the human answers (normally 10), in [0, 1].

    The leave-one-out average over the answers of ``min(1, #matching answers among the others / 3)``: a prediction
    given by at least 4 of 10 humans scores 1, by 3 scores 0.9, by 2 scores 0.6, by 1 scores 0.3. ``scheme`` selects
    how answers are normalised (module doc); an empty answer list scores 0, as lmms-eval's VizWiz scorer does.
    """
    if not answers:
        return 0.0
    pred = normalize_answer(prediction)
    if scheme == "evalai":
        gts = [normalize_answer(answer) for answer in answers]
    elif scheme == "vqav2":
        gts = [_vqav2_strip(answer) for answer in answers]
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(answer)) for answer in gts]
            pred = process_digit_article(process_punctuation(pred))
    else:
        raise ValueError(f"unknown VQA scheme {scheme!r}; expected 'evalai' or 'vqav2'")
    hits = [gt == pred for gt in gts]
    total = sum(hits)
    # Leaving answer i out removes its own hit from the count; upstream drops it by identity, which is the same.
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(hits)
