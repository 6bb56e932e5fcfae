"""Evaluation: lmms-eval-compatible metrics and benchmark readers, CLIP score, the shapes judge, callbacks.

* :mod:`vargpt.eval.core` - the one way a model answers questions and draws images, for every path below.
* :mod:`vargpt.eval.benchmarks` - the benchmark registry (one record per benchmark), file reading and scoring;
  :mod:`vargpt.eval.benchmark_items` (item builders) and :mod:`vargpt.eval.benchmark_scores` (scorers).
* :mod:`vargpt.eval.vqa` - the VQA / EvalAI answer normaliser and VQA accuracy.
* :mod:`vargpt.eval.metrics` - exact match, option-letter matching, POPE and MME metrics.
* :mod:`vargpt.eval.clip_score` - CLIP score with open_clip from a local checkpoint (imports torch and open_clip).
* :mod:`vargpt.eval.image_analysis` - what the shapes judge sees in an image (background, objects, attributes).
* :mod:`vargpt.eval.judge` - the shapes world's programmatic judge of generated images: verdicts, validation.
* :mod:`vargpt.eval.shapes_eval` - the shapes world's held-out items and VQA, text-to-image and CLIP figures.
* :mod:`vargpt.eval.predictions` - predictions files (resumable JSON lines) and the ``run.json`` guarding them.
* :mod:`vargpt.eval.runner` - what ``src/eval.py`` runs: benchmarks with batched generation, resumable.
* :mod:`vargpt.eval.callbacks` - Lightning callbacks: image grids, CLIP score, VQA and judge during training.
* :mod:`vargpt.eval.grid` - a picture of a shapes evaluation (generated images over the ground truth).
"""
