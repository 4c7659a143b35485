"""The engine's benchmarks, each a ``python -m`` script printing ratios against a named baseline
measured in the same run: overhead.py (the Trainer's step vs a hand-written DeepSpeed loop), data.py
(corpus preparation vs datasets.map), placement.py (teacher placement memory and step time)."""
