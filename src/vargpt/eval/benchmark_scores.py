"""Scorers of the benchmarks' prediction records, one per benchmark, each computed as lmms-eval does (see
:mod:`vargpt.eval.vqa` and :mod:`vargpt.eval.metrics` for every quirk and the choices made).

A scorer takes the records (``item.record(prediction)`` dicts) and ``faithful`` (False repairs the lmms-eval bugs
that have a repaired variant) and returns ``{metric: value}`` in percent (MME in its own points). The registry
(:data:`vargpt.eval.benchmarks.BENCHMARKS`) names each benchmark's scorer; :func:`vargpt.eval.benchmarks.score`
runs it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vargpt.eval.metrics import (
    exact_match,
    mmbench_circular_accuracy,
    mme_scores,
    mmmu_extract_option,
    mmmu_open_correct,
    mmmu_parse_open,
    pope_metrics,
    scienceqa_correct,
    seedbench_correct,
)
from vargpt.eval.vqa import VQAScheme, vqa_accuracy

Scorer = Callable[[Sequence[Mapping[str, Any]], bool], dict[str, float]]


def _percent(values: Sequence[float]) -> float:
    """Mean of per-item scores in percent (0 for no items)."""
    return 100.0 * sum(values) / len(values) if values else 0.0


def vqa_scorer(scheme: VQAScheme) -> Scorer:
    """A scorer averaging :func:`vqa_accuracy` with the given normalisation scheme."""

    def scorer(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
        """Mean VQA accuracy in percent."""
        return {"accuracy": _percent([vqa_accuracy(r["prediction"], r["answers"], scheme) for r in records])}

    return scorer


def score_gqa(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Exact match, ignoring case and punctuation."""
    return {"accuracy": _percent([exact_match(r["prediction"], r["answers"][0]) for r in records])}


def score_scienceqa(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Option-letter accuracy."""
    return {"accuracy": _percent([scienceqa_correct(r["prediction"], r["answers"][0], faithful) for r in records])}


def score_pope(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Overall POPE metrics (lmms-eval's ``pope`` task's, plus ``predicted_yes_ratio``: see
    :func:`~vargpt.eval.metrics.pope_metrics`) and the same per category (adversarial / popular / random; VARGPT
    reports adversarial accuracy), in percent."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list, {"": []})
    for record in records:
        groups[""].append(record)
        groups[f"{record['category']}/"].append(record)
    scores = {}
    for prefix, group in sorted(groups.items()):
        metrics = pope_metrics([r["prediction"] for r in group], [r["answers"][0] for r in group])
        scores.update({f"{prefix}{name}": 100.0 * value for name, value in metrics.items()})
    return scores


def score_mme(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Per-category acc / acc+ / score and the perception and cognition sums."""
    return mme_scores((r["question_id"], r["category"], r["prediction"], r["answers"][0]) for r in records)


def score_mmbench(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """CircularEval accuracy over the questions whose original row was scored."""
    accuracy, _ = mmbench_circular_accuracy(
        (r["index"], r["prediction"], r["answers"][0], r["options"]) for r in records
    )
    return {"accuracy": 100.0 * accuracy}


def score_seedbench(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Accuracy over all questions and per data type ("image", "video"; VARGPT reports SEED-Bench images)."""
    by_type: dict[str, list[float]] = defaultdict(list, {"all": []})
    for record in records:
        hit = seedbench_correct(record["prediction"], record["answers"][0])
        by_type["all"].append(hit)
        by_type[record["data_type"]].append(hit)
    return {f"{data_type}/accuracy": _percent(hits) for data_type, hits in sorted(by_type.items())}


def _mmmu_correct(record: Mapping[str, Any], faithful: bool) -> float:
    """One MMMU question: the parsed option letter, or the parsed open answer, against the gold answer."""
    answer, prediction = record["answers"][0], record["prediction"]
    if record["question_type"] == "multiple-choice":
        return float(mmmu_extract_option(prediction, record["options"], record["id"], faithful) == answer)
    return mmmu_open_correct(answer, mmmu_parse_open(prediction))


def score_mmmu(records: Sequence[Mapping[str, Any]], faithful: bool) -> dict[str, float]:
    """Accuracy over multiple-choice and open questions."""
    # Upstream averages per subject weighted by size, which equals the plain mean over questions.
    return {"accuracy": _percent([_mmmu_correct(r, faithful) for r in records])}
