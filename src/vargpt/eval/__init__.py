"""Evaluation: benchmark metrics as lmms-eval computes them, benchmark readers, and the CLIP score.

* :mod:`vargpt.eval.vqa` - the VQA / EvalAI answer normaliser and VQA accuracy.
* :mod:`vargpt.eval.metrics` - exact match, option-letter matching, POPE and MME metrics.
* :mod:`vargpt.eval.benchmarks` - readers for local copies of the lmms-lab parquet files, and per-benchmark scoring.
* :mod:`vargpt.eval.clip_score` - CLIP score with open_clip from a local checkpoint (imports torch and open_clip).
"""
