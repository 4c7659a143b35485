"""Downstream fine-tuning and evaluation: is the student any good, and what did compaction buy?
``biodistill-evaluate --config configs/eval/<suite>.yaml`` (see cli.py)."""
