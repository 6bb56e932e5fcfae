"""Preference data made by running a model: the self-improving loop's pairs (``self_improve``) and the reference
log-probabilities precomputed into pair shards (``reference_logps``). The preference loss and its LightningModule
are training's (vargpt.training.preference, vargpt.training.preference_module)."""
