# The two commands of the README: `make train` and `make test`. Each works on a fresh machine.
PYTHON ?= python

.PHONY: install slurm train test test-paths gpu-check

# torch first and pinned: resolved through another package it could pull a multi-GB CUDA build.
install:
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"

# Debian's SLURM and munge, for the real-cluster tests (skipped cleanly where they are absent).
slurm:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v slurmctld >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends slurmctld slurmd slurm-client munge slurmdbd mariadb-server \
			>/dev/null; \
	fi

train: install
	$(PYTHON) train.py

# The CPU kernel path first, so that a failure is attributable at a glance (tests/conftest.py).
test: install slurm
	$(PYTHON) -m postmortem.kernel_path
	$(PYTHON) -m pytest

# The bf16-sensitive tests again on every kernel path below this CPU's (tests/conftest.py).
BF16_SENSITIVE = tests/monitor tests/postmortem tests/optim/test_engine.py \
	tests/heal/test_loop.py::test_attention_logits_at_high_lr_in_bf16_are_soft_capped
test-paths: install
	@$(PYTHON) -m postmortem.kernel_path --lower-paths | while read -r path; do \
		echo "== $$path"; env $$path $(PYTHON) -m pytest -q $(BF16_SENSITIVE) </dev/null || exit 1; \
	done

# On a machine with a CUDA GPU (no internet needed, nothing installed): the gpu-marked tests,
# then the benchmark, as one JSON (docs/performance.md). Without CUDA it exits 2.
GPU_CHECK_OUT ?= gpu_check.json
gpu-check:
	$(PYTHON) -m bench.gpu_check --out $(GPU_CHECK_OUT)
