"""Task-specific distillation: a teacher fine-tuned on a task teaches a student with a fresh task head, on the
task's examples and on unlabeled in-domain sentences (TinyBERT's second stage).

- ``examples.py``: the task's examples as the engine trains on them (read by biodistill-evaluate's readers,
  tokenised by its feature code), unlabeled sentences from the corpora, the sampler's view and the collator;
- ``teacher.py``: a base teacher fine-tuned first (one evaluation cell), cached by content; the head check;
- ``stored.py``: the teacher's task logits computed once, sharded across ranks, checksummed, and reused.

The loop, the Distiller and the loss terms (``task_kl``, ``task_ce``) are the general engine's.
"""
