"""Evaluation: lmms-eval-compatible metrics and benchmark readers, CLIP score, the shapes judge, callbacks.

* :mod:`vargpt.eval.vqa` - the VQA / EvalAI answer normaliser and VQA accuracy.
* :mod:`vargpt.eval.metrics` - exact match, option-letter matching, POPE and MME metrics.
* :mod:`vargpt.eval.benchmarks` - readers for local copies of the lmms-lab parquet files, and per-benchmark scoring.
* :mod:`vargpt.eval.clip_score` - CLIP score with open_clip from a local checkpoint (imports torch and open_clip).
* :mod:`vargpt.eval.judge` - the shapes world's programmatic judge of generated images (colour, shape).
* :mod:`vargpt.eval.shapes_eval` - held-out VQA, text-to-image and CLIP figures on the shapes world.
* :mod:`vargpt.eval.runner` - what ``src/eval.py`` runs: benchmarks with batched generation, resumable.
* :mod:`vargpt.eval.callbacks` - Lightning callbacks: image grids, CLIP score, VQA and judge during training.
"""
