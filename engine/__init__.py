"""biodistill.engine: distil a frozen teacher into a student under DeepSpeed.

Where each part lives, and the data flow of one job, is docs/layout.md (one map, kept in one place). The four
files a newcomer reads first are here at the root: cli.py (parse, check, train, close), config.py (the typed
recipe), trainer.py (the loop) and distiller.py (one distillation forward), with losses.py (the terms) beside
them. Imports point one way: cli -> trainer -> distiller -> data/, models/, losses, runtime/ -> config; runtime/
imports neither data/ nor models/; kernels/ (biodistill.kernels) imports nothing of the engine's but the
MiniALBERT model its whole-step benchmark trains.
"""
