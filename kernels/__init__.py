"""Fused kernels for distillation, each with one shared pure-PyTorch reference (``reference.py``).

The engine calls the functions exported here. Each dispatches on the tensors it is given: CUDA
tensors take a Triton kernel where one exists, CPU tensors the reference. Nothing in this package
imports the engine.
"""

from biodistill.kernels.reference import temperature_kl

__all__ = ["temperature_kl"]
