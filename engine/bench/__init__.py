"""The engine's benchmarks, each a ``python -m`` script printing ratios against a named baseline
measured in the same run: overhead.py (the Trainer's step vs a hand-written DeepSpeed loop), data.py
(corpus preparation vs datasets.map), placement.py (teacher placement memory and step time), step.py (a
full-size recipe step: tokens/s, MFU, peak memory, teacher share, fused kernels vs the reference), and
gpu_check.py, which runs the GPU's share of them all (``make gpu-check``)."""
