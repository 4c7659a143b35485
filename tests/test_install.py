"""What a fresh install gives a user who runs the README's commands from the repository root.

``python -m ...`` puts the root first on ``sys.path``, where our kernels/ folder sits beside Hugging Face's
``kernels`` package in site-packages (transformers 5.25+ imports it at ``import transformers``). setup.py's
docstring says why kernels/ has no ``__init__.py``; these tests hold both sides of it: with Hugging Face's
package installed, the root's folder never shadows it; without it (older transformers), transformers reads
the root's empty namespace as "not installed".
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys

from conftest import REPO

# Run from the root as the README does: the root is sys.path[0] for `python -m` and `python -c`.
PROBE = r"""
import importlib.util, json
import kernels
import transformers
from transformers.utils import import_utils
report = {"file": getattr(kernels, "__file__", None), "spec": importlib.util.find_spec("kernels").origin,
          "available": import_utils.is_kernels_available()}
if report["available"]:
    from transformers.integrations import hub_kernels
    report["CUDAProperties"] = hasattr(hub_kernels, "CUDAProperties")
print(json.dumps(report))
"""


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_kernels_folder_is_not_a_regular_package():
    """An ``__init__.py`` in kernels/ makes the folder a regular package, which shadows Hugging Face's from the
    root (``ImportError: cannot import name 'CUDAProperties' from 'kernels'``): the entry points live in ops.py."""
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py is back: see setup.py's docstring"
    assert not (REPO / "kernels.py").exists()


def test_the_root_never_shadows_hugging_face_kernels():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if _hf_kernels_installed():  # transformers 5.25+: the import at `import transformers` gets Hugging Face's
        assert report["available"] and report["CUDAProperties"], report
        assert not report["file"].startswith(str(REPO)) and not report["spec"].startswith(str(REPO)), report
    else:  # older transformers: our folder is at most an empty namespace, which transformers reads as absent
        assert report["file"] is None and not report["available"], report


def test_module_entry_points_start_from_the_root():
    """The README's `python -m` commands, each from the root (in parallel: each pays torch's import once).
    Collecting test_losses.py imports transformers and biodistill.kernels.ops, as `make test` does."""
    commands = {
        "engine": [sys.executable, "-m", "biodistill.engine", "--help"],
        "evaluate": [sys.executable, "-m", "biodistill.engine.evaluate", "--help"],
        "inspect": [sys.executable, "-m", "biodistill.kernels.inspect", "--help"],
        "prepare": [sys.executable, "-m", "biodistill.engine.data.cache", "--help"],
        "collect": [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider", "tests/test_losses.py"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = {
        name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"{' '.join(commands[name][1:])} from {REPO}: {err[-3000:]}"
        assert "usage:" in out or "tests collected" in out, (name, out[-500:])
