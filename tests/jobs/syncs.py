"""Count the host-device syncs a training step makes: every call that, on a GPU, makes the host wait for
the device. Used by the job scripts (``matrix.py --count-syncs``); on a CPU the calls are the same ones
a GPU run makes, so counting them here is counting them there.

Counted: ``Tensor.item / cpu / tolist / numpy / nonzero / masked_select``, ``bool() / float() / int()`` of a
tensor, ``.to("cpu")``, and indexing with a boolean tensor (a data-dependent shape: a hidden nonzero),
each when called from inside ``Trainer.train_step``, except from the data pipeline (engine/data/: it
runs on the host by design, before the batch is copied to the device) and from torch.optim (a
non-capturable Adam keeps its step counters on the host on a GPU too: reading them waits for nothing).

Each call is filed under its owner, the package of the innermost frame outside torch: ``biodistill``
(this engine, which must make none), ``transformers``, ``deepspeed``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

METHODS = ("item", "cpu", "tolist", "numpy", "nonzero", "masked_select", "__bool__", "__float__", "__int__")
DATA = str(Path(__file__).resolve().parents[2] / "engine" / "data")
TORCH = str(Path(torch.__file__).parent)
OPTIM = str(Path(torch.__file__).parent / "optim")
REPO = str(Path(__file__).resolve().parents[2])


def _call_site() -> str | None:
    """Where the call was made from (the frames outside torch, innermost first, up to train_step), if that
    is inside Trainer.train_step and not inside the data pipeline."""
    frame, sites = sys._getframe(2), []
    while frame is not None:
        code = frame.f_code
        if code.co_filename.startswith(DATA) or (not sites and code.co_filename.startswith(OPTIM)):
            return None
        if not code.co_filename.startswith(TORCH) and code.co_filename != __file__:
            sites.append(f"{code.co_filename}:{frame.f_lineno} ({code.co_name})")
        if code.co_name == "train_step" and code.co_filename.endswith("trainer.py"):
            return " < ".join(sites)
        frame = frame.f_back
    return None


def owner(call: str) -> str:
    """``biodistill``, ``transformers``, ``deepspeed``, ...: who made a call recorded by :func:`install`."""
    path = call.split(" @ ", 1)[1].split(" < ", 1)[0]
    if path.startswith(REPO):
        return "biodistill"
    return path.split("site-packages/", 1)[-1].split("/", 1)[0]


def install() -> list[str]:
    """Wrap the sync points; returns the list each counted call appends its call site and method to."""
    calls: list[str] = []

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            site = _call_site()
            if site is not None:
                calls.append(f"Tensor.{name} @ {site}")
            return original(self, *args, **kwargs)

        return counted

    for name in METHODS:
        setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))

    original_to, original_getitem = torch.Tensor.to, torch.Tensor.__getitem__

    def to(self, *args, **kwargs):
        target = args[0] if args else kwargs.get("device")
        if isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu" and self.device.type != "cpu":
            site = _call_site()
            if site is not None:
                calls.append(f"Tensor.to(cpu) @ {site}")
        return original_to(self, *args, **kwargs)

    def getitem(self, key):
        keys = key if isinstance(key, tuple) else (key,)
        if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
            site = _call_site()
            if site is not None:
                calls.append(f"boolean-mask indexing @ {site}")
        return original_getitem(self, key)

    torch.Tensor.to, torch.Tensor.__getitem__ = to, getitem
    return calls
