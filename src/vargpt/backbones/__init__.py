"""Stage-0 recipes: the embedded default's pretrained parts (VQ-VAE, class-conditional VAR, CLIP vision tower,
language model, CLIP-score judge), made by the same Hydra app and Lightning loop as the VARGPT stages."""
