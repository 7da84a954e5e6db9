# Set-up and the main jobs. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= $(if $(COMPRESS_DATA_DIR),$(COMPRESS_DATA_DIR),../shared/data)
DEMO_OUT ?= demo-out
MODEL ?= smollm2-135m
export COMPRESS_DATA_DIR := $(abspath $(DATA))

.PHONY: setup demo oracle test test-fast families bench-rtn bench-ptq bench-llmcompressor bench-prune bench-train bench-scale plots clean

# Nothing is byte-compiled at install (that is more than half of an install's time): Python
# compiles each module the first time a command imports it and keeps the result, also where the
# environment says PYTHONDONTWRITEBYTECODE (which would make every command compile again).
export PYTHONDONTWRITEBYTECODE :=
PIP := $(BIN)/python -m pip install -q --no-compile --upgrade -c constraints.txt

# The package and its core dependencies (all `make demo` needs), then the test and ONNX extras.
$(BIN)/.installed-core: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

$(BIN)/.installed: $(BIN)/.installed-core
	$(PIP) -e '.[test,onnx]'
	touch $@

setup: $(BIN)/.installed

# Quantize the default model (RTN 4-bit, group 128), evaluate base and quantized, write a report
# (the base model's per-window results from the --base run are reused by its own evaluation).
demo: $(BIN)/.installed-core
	$(BIN)/compress models fetch $(MODEL)
	$(BIN)/compress quantize $(MODEL) --method rtn --bits 4 --group-size 128 --sym -o $(DEMO_OUT)/rtn-int4-g128
	$(BIN)/compress inspect $(DEMO_OUT)/rtn-int4-g128
	$(BIN)/compress eval ppl $(DEMO_OUT)/rtn-int4-g128 --base $(MODEL) --json $(DEMO_OUT)/rtn-int4-g128.json
	$(BIN)/compress eval ppl $(MODEL) --json $(DEMO_OUT)/base.json
	$(BIN)/compress report $(DEMO_OUT)/base.json $(DEMO_OUT)/rtn-int4-g128.json -o $(DEMO_OUT)/report.md

# llama.cpp's own quantizers, the outside oracle of the byte-exact tests in tests/formats: built once
# (~90 s on 2 cores), cached in the folder oracle/ of $COMPRESS_CACHE_DIR (~/.cache/compress). Without cmake, a
# C/C++ compiler or the source package it says so and those tests skip; COMPRESS_REQUIRE_ORACLE=1 (CI)
# makes that an error. A failed build is always an error.
oracle: setup
	$(BIN)/python -m tests.formats.conftest

test: setup oracle
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench-rtn: setup
	$(BIN)/python bench/ptq.py --suite rtn --eval-chunk 7 --out bench/results/ptq-rtn-smollm2.json

# The README's method comparison (GPTQ, AWQ, awq+gptq, SmoothQuant, both GPTQ grids; about 4 CPU-hours on 2 cores).
bench-ptq: setup
	$(BIN)/python bench/ptq.py --suite compare-gptq --eval-chunk 8 --out bench/results/ptq-compare-gptq-smollm2.json
	$(BIN)/python bench/ptq.py --suite compare-awq-sq --eval-chunk 8 --out bench/results/ptq-compare-awq-sq-smollm2.json
	$(BIN)/python bench/ptq.py --suite compare-gptq-mse --eval-chunk 8 --out bench/results/ptq-compare-gptq-mse-smollm2.json
	$(BIN)/python bench/ptq.py --suite compare-awq-mse --eval-chunk 8 --out bench/results/ptq-compare-awq-mse-smollm2.json
	$(BIN)/python bench/ptq.py --table bench/results/ptq-rtn-smollm2.json bench/results/ptq-compare-*.json

# Our GPTQ beside llm-compressor's (in its own virtual environment) on the same windows, in one run.
bench-llmcompressor: setup
	bench/peers/setup.sh llmcompressor
	$(BIN)/python bench/ptq.py --suite compare-llmcompressor --eval-chunk 4 --out bench/results/ptq-compare-llmcompressor-smollm2.json

# Pruning: ours beside llm-compressor's (its own virtual environment), OWL, joint quantization, sizes,
# and structured pruning with its CPU speed (about 1.5 CPU-hours on 2 cores).
bench-prune: setup
	bench/peers/setup.sh llmcompressor
	$(BIN)/python bench/prune.py --suite compare --max-windows 16 --out bench/results/prune-compare-smollm2.json
	$(BIN)/python bench/prune.py --suite quality --max-windows 16 --out bench/results/prune-quality-smollm2.json
	$(BIN)/python bench/prune.py --suite structured --max-windows 16 --out bench/results/prune-structured-smollm2.json

# Training: QAT against post-training quantization, and distillation healing structured pruning
# (about 2 CPU-hours on 2 cores).
bench-train: setup
	$(BIN)/python bench/train.py --suite distill --seqlen 256 --kd-steps 40 --kd-batch 8 --kd-lr 1e-4 --black-box --out bench/results/train-distill-smollm2.json
	$(BIN)/python bench/train.py --suite qat --nsamples 64 --out bench/results/train-qat-smollm2.json
	$(BIN)/python bench/train.py --suite qat --nsamples 64 --only "qat 3-bit g128 gptq" --exports --out bench/results/train-qat-exports-smollm2.json
	$(BIN)/python bench/train.py --suite lora --nsamples 64 --out bench/results/train-lora-smollm2.json
	$(BIN)/python bench/train.py --suite qat-kquant --nsamples 64 --out bench/results/train-qat-kquant-smollm2.json

# Beyond one process and one machine's memory: --nproc, --stream on SmolLM2 and on a 5.9 GB
# synthetic model under a 3 GiB cap, the memory preflight (about 45 minutes on 2 cores).
bench-scale: setup
	$(BIN)/python bench/scale.py --suite preflight --out bench/results/scale-preflight-smollm2.json
	$(BIN)/python bench/scale.py --suite stream --out bench/results/scale-stream-smollm2.json
	$(BIN)/python bench/scale.py --suite stream --gguf --nsamples 32 --out bench/results/scale-stream-smollm2-gguf.json
	$(BIN)/python bench/scale.py --suite nproc --nproc 2 --out bench/results/scale-nproc-smollm2.json
	$(BIN)/python bench/scale.py --suite synthetic --nsamples 16 --seqlen 512 --out bench/results/scale-stream-synthetic.json
	$(BIN)/python bench/scale.py --suite synthetic-kquant --out bench/results/scale-stream-synthetic-kquant.json

# The README's table of what works per model family, from the family tests' own records.
families: setup
	COMPRESS_FAMILY_TABLE=docs/families.json $(BIN)/python -m pytest -q tests/test_families.py
	$(BIN)/python -m tests.family_table docs/families.json README.md

# The README's quality-against-size plots, from the committed results files.
plots: setup
	$(BIN)/python bench/plot.py bench/results/ptq-rtn-smollm2.json bench/results/ptq-compare-gptq-smollm2.json \
	    bench/results/ptq-compare-gptq-mse-smollm2.json bench/results/ptq-compare-awq-sq-smollm2.json \
	    bench/results/ptq-compare-awq-mse-smollm2.json \
	    --title "SmolLM2-135M, wt2-quick: post-training quantization (bench/ptq.py)" --out docs/img/ptq-smollm2.png
	$(BIN)/python bench/plot.py bench/results/kquants-smollm2.json \
	    --title "SmolLM2-135M, wt2-quick: k-quant GGUF mixes (bench/kquants.py)" --out docs/img/kquants-smollm2.png

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
