"""VQA normaliser and accuracy, and the benchmark metrics, on known cases and edge cases."""

from __future__ import annotations

import logging

import pytest

from vargpt.eval.metrics import (
    exact_match,
    mmbench_circular_accuracy,
    mmbench_extract_option,
    mme_parse_yes_no,
    mme_scores,
    mmmu_extract_option,
    mmmu_open_correct,
    mmmu_parse_open,
    option_letters,
    pope_metrics,
    scienceqa_correct,
    seedbench_correct,
)
from vargpt.eval.vqa import normalize_answer, process_punctuation, vqa_accuracy

# ------------------------------------------------------------------------------------------------ VQA normaliser


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # The processing steps listed by the VQA evaluation page (visualqa.org/evaluation).
        ("Yes", "yes"),  # lowercase
        ("two", "2"),  # number words to digits
        ("Ten dogs", "10 dogs"),
        ("none", "0"),
        ("the cat", "cat"),  # articles removed
        ("a man on an elephant", "man on elephant"),
        ("dont", "don't"),  # missing apostrophes restored
        ("isnt it", "isn't it"),
        ("yes.", "yes"),  # periods removed ...
        ("3.5", "3.5"),  # ... except as decimal points
        ("100,978", "100978"),  # comma between digits removed
        ("black-and-white", "black and white"),  # punctuation not touching a space becomes a space
        ("t - shirt", "t shirt"),  # punctuation touching a space is deleted
        ("what?", "what"),
        ("man's hat", "man 's hat"),  # EvalAI splits the possessive
        ("red\nand\tblue", "red and blue"),
        ("  Two  ", "2"),
    ],
)
def test_normalize_answer_documented_cases(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_normalize_answer_keeps_lmms_eval_period_quirks() -> None:
    # The malformed look-behind removes a period after a digit too ...
    assert normalize_answer("2.") == "2"
    # ... and re.UNICODE passed as `count` removes at most 32 periods.
    assert normalize_answer("." * 40) == "." * 8


def test_process_punctuation_digit_comma_deletes_every_mark() -> None:
    # A digit-comma-digit anywhere makes every mark be deleted instead of spaced out ("a-b" -> "ab").
    assert process_punctuation("1,000 a-b") == "1000 ab"
    assert process_punctuation("a-b") == "a b"


# ------------------------------------------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(("matches", "expected"), [(10, 1.0), (4, 1.0), (3, 0.9), (2, 0.6), (1, 0.3), (0, 0.0)])
def test_vqa_accuracy_leave_one_out(matches: int, expected: float) -> None:
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    assert vqa_accuracy("yes", answers) == pytest.approx(expected)
    assert vqa_accuracy("yes", answers, scheme="vqav2") == pytest.approx(expected)


def test_vqa_accuracy_normalises_prediction_and_answers() -> None:
    assert vqa_accuracy("Two.", ["2"] * 10) == 1.0
    assert vqa_accuracy("2", ["two"] * 10) == 1.0
    assert vqa_accuracy("The Dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx(0.9)


def test_vqa_accuracy_empty_answers_scores_zero() -> None:
    assert vqa_accuracy("yes", []) == 0.0


def test_vqa_accuracy_vqav2_scheme_quirks() -> None:
    # Identical human answers are compared unprocessed: "a dog" never equals the normalised "dog".
    assert vqa_accuracy("dog", ["a dog"] * 10, scheme="vqav2") == 0.0
    assert vqa_accuracy("dog", ["a dog"] * 10, scheme="evalai") == 1.0
    # Disagreeing answers get punctuation/article processing, so then they match.
    assert vqa_accuracy("dog", ["a dog"] * 5 + ["cat"] * 5, scheme="vqav2") == 1.0
    # ... but not the possessive split that only the prediction gets.
    assert vqa_accuracy("man's", ["man's"] * 5 + ["men"] * 5, scheme="vqav2") == 0.0
    assert vqa_accuracy("man's", ["man's"] * 5 + ["men"] * 5, scheme="evalai") == 1.0


def test_vqa_accuracy_rejects_unknown_scheme() -> None:
    with pytest.raises(ValueError, match="scheme"):
        vqa_accuracy("yes", ["yes"], scheme="okvqa")  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------------------- exact match


def test_exact_match_gqa_settings() -> None:
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match(" left ", "left") == 1.0
    assert exact_match("yes", "no") == 0.0
    assert exact_match("Yes", "yes", ignore_case=False) == 0.0
    assert exact_match("yes.", "yes", ignore_punctuation=False) == 0.0
    assert exact_match("", "") == 1.0


# ------------------------------------------------------------------------------------------------ option letters


def test_option_letters() -> None:
    assert option_letters(4) == ["A", "B", "C", "D"]
    assert option_letters(0) == []


def test_scienceqa_correct_and_its_dead_fallback() -> None:
    assert scienceqa_correct("A", "A") == 1.0
    assert scienceqa_correct(" b\n", "B") == 1.0
    assert scienceqa_correct("C", "B") == 0.0
    assert scienceqa_correct("A. The cat", "A") == 0.0  # faithful: the fallback never fires
    assert scienceqa_correct("A. The cat", "A", faithful=False) == 1.0
    assert scienceqa_correct("B. The cat", "A", faithful=False) == 0.0


def test_seedbench_correct_takes_the_first_character_in_any_case() -> None:
    assert seedbench_correct("A", "A") == 1.0
    assert seedbench_correct("B. a dog", "B") == 1.0
    assert seedbench_correct(" a", "A") == 1.0  # lmms-eval lowercases both sides
    assert seedbench_correct("b) a dog", "B") == 1.0
    assert seedbench_correct("The answer is A", "A") == 0.0  # the first letter is "T"
    assert seedbench_correct("", "A") == 0.0


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("B", "B"),
        ("The answer is B", "B"),
        ("(C)", "C"),
        ("D.", "D"),
        ("Answer :A", "A"),
        ("A cat sits on it", "B"),  # "A" in a long answer may be the article: falls back to the option text
        ("I think it is a dog", "A"),
        ("A or B", None),  # two letters: ambiguous
        ("no idea", None),
    ],
)
def test_mmbench_extract_option(prediction: str, expected: str | None) -> None:
    assert mmbench_extract_option(prediction, {"A": "dog", "B": "cat"}) == expected


def test_mmbench_circular_accuracy() -> None:
    options = {"A": "dog", "B": "cat"}
    records = [
        (0, "A", "A", options),
        (1_000_000, "B", "B", options),  # rotated copy of question 0, right
        (1, "A", "A", options),
        (1_000_001, "A", "B", options),  # rotated copy of question 1, wrong: question 1 fails
        (2_000_002, "A", "A", options),  # copy whose original is absent: not scored
    ]
    assert mmbench_circular_accuracy(records) == (0.5, 2)
    assert mmbench_circular_accuracy([]) == (0.0, 0)


def test_mmmu_extract_option() -> None:
    options = ["blue car", "red car", "green bike"]
    assert mmmu_extract_option("(B)", options, "q1") == "B"
    assert mmmu_extract_option("C", options, "q1") == "C"
    assert mmmu_extract_option("The answer is C.", options, "q1") == "C"
    assert mmmu_extract_option("A or B", options, "q1") == "B"  # several: the last one
    assert mmmu_extract_option("I believe the right one is the red car for sure", options, "q1") == "B"


def test_mmmu_extract_option_without_candidate() -> None:
    options = ["blue car", "red car", "green bike"]
    drawn = mmmu_extract_option("no idea", options, "validation_Art_1")
    assert drawn in {"A", "B", "C"}
    assert mmmu_extract_option("no idea", options, "validation_Art_1") == drawn  # seeded by the id
    assert mmmu_extract_option("no idea", options, "validation_Art_1", faithful=False) is None


def test_mmmu_open_answers() -> None:
    assert mmmu_open_correct("42", mmmu_parse_open("The answer is 42.")) == 1.0
    assert mmmu_open_correct("42.001", mmmu_parse_open("so the result = 42")) == 1.0
    assert mmmu_open_correct("1,200", mmmu_parse_open("1200")) == 1.0
    assert mmmu_open_correct("Paris", mmmu_parse_open("The capital is Paris")) == 1.0
    assert mmmu_open_correct("43", mmmu_parse_open("The answer is 42.")) == 0.0


# -------------------------------------------------------------------------------------------------------- POPE


def test_pope_all_yes() -> None:
    metrics = pope_metrics(["yes"] * 4, ["yes", "yes", "yes", "no"])
    # lmms-eval's names and meanings (pope_yes_ratio: the share of yes in the ground truth), ours apart.
    assert metrics == pytest.approx({
        "pope_accuracy": 0.75, "pope_precision": 0.75, "pope_recall": 1.0, "pope_f1_score": 6 / 7,
        "pope_yes_ratio": 0.75, "predicted_yes_ratio": 1.0,
    })  # fmt: skip


def test_pope_perfect_and_all_no() -> None:
    answers = ["yes", "no", "no"]
    assert pope_metrics(["Yes", " no", "NO"], answers)["pope_f1_score"] == pytest.approx(1.0)
    all_no = pope_metrics(["no"] * 3, answers)
    assert all_no["pope_precision"] == 0.0 and all_no["pope_recall"] == 0.0 and all_no["pope_f1_score"] == 0.0
    assert all_no["pope_accuracy"] == pytest.approx(2 / 3)
    assert all_no["predicted_yes_ratio"] == 0.0 and all_no["pope_yes_ratio"] == pytest.approx(1 / 3)


def test_pope_unparsable_answers_are_wrong_but_not_false_negatives() -> None:
    metrics = pope_metrics(["Yes.", "yes", "no"], ["yes", "yes", "no"])
    assert metrics["pope_accuracy"] == pytest.approx(2 / 3)
    assert metrics["pope_recall"] == 1.0  # "Yes." is neither "yes" nor "no": not counted as a false negative
    assert metrics["pope_precision"] == 1.0


def test_pope_edge_cases() -> None:
    assert set(pope_metrics([], []).values()) == {0.0}
    with pytest.raises(ValueError, match="yes or no"):
        pope_metrics(["yes"], ["maybe"])
    with pytest.raises(ValueError, match="predictions"):
        pope_metrics(["yes"], [])


# --------------------------------------------------------------------------------------------------------- MME


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("y", "yes"),
        ("n", "no"),
        ("x", "other"),
        ("Yes, there is a dog.", "yes"),
        ("Not sure", "no"),  # "no" within the first 4 characters
        ("There is no dog", "other"),  # "no" only later
        ("", "other"),
    ],
)
def test_mme_parse_yes_no(prediction: str, expected: str) -> None:
    assert mme_parse_yes_no(prediction) == expected


def test_mme_scores_pairs(caplog: pytest.LogCaptureFixture) -> None:
    records = [
        ("existence/1.png", "existence", "Yes", "Yes"),
        ("existence/1.png", "existence", "No", "No"),
        ("existence/2.png", "existence", "Yes", "Yes"),
        ("existence/2.png", "existence", "Yes", "No"),
        ("code/3.png", "code_reasoning", "No", "Yes"),
        ("code/3.png", "code_reasoning", "Yes", "No"),
        ("code/4.png", "code_reasoning", "Yes", "Yes"),  # lone question of a truncated run: left out
    ]
    with caplog.at_level(logging.WARNING):
        scores = mme_scores(records)
    assert "left out" in caplog.text
    assert scores["existence/acc"] == 75.0
    assert scores["existence/acc_plus"] == 50.0
    assert scores["existence/score"] == 125.0
    assert scores["code_reasoning/score"] == 0.0
    assert scores["perception"] == 125.0
    assert scores["cognition"] == 0.0


def test_mme_scores_edge_cases() -> None:
    assert mme_scores([]) == {"perception": 0.0, "cognition": 0.0}
    triple = [("c/1.png", "color", "Yes", "Yes")] * 3
    with pytest.raises(ValueError, match="more than two"):
        mme_scores(triple)
    with pytest.raises(ValueError, match="yes or no"):
        mme_scores([("c/1.png", "color", "Yes", "Maybe")])
