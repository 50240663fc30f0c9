# sparsekern: the two set-up commands are `make demo` (main job) and `make test` (test suite).
# Both create .venv and install on first use. `make gpu-check` runs on a GPU machine with its own
# python3 (no venv, no pip): PYTHONPATH=. is all it needs.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
RESULTS ?= benchmarks/results

.PHONY: venv demo mnist methods methods-quick imagenet-smoke test lint format bench compile-check gpu-check gpu-bench-full clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# The main job: Han et al.'s LeNet-300-100 row (Table 1) on real MNIST, the full configuration:
# results/lenet300's command (preset scripts/config/lenet300.py), into runs/; then Deep
# Compression's storage table of the pruned net. 40 epochs of ~2 s on an idle 2-core machine.
demo: venv
	$(VPY) scripts/prune_mnist.py --preset lenet300 --val-images 0 --out runs/demo-lenet300 --overwrite --no-progress

# The results committed in results/, one command each: the validation searches (the presets'
# "searched" knobs come from results/search/*.json), the two Table 1 rows with those knobs on all
# 60,000 training images, as Han trained (LeNet-5 ~27 min on 1 thread), the small summary CI
# reproduces exactly (tests/scripts/test_prune_mnist.py), then the README's results table.
mnist: venv
	$(VPY) scripts/search_mnist.py --preset lenet300 --jobs 2
	$(VPY) scripts/search_mnist.py --preset lenet5 --jobs 2
	$(VPY) scripts/prune_mnist.py --preset lenet300 --val-images 0 --overwrite --no-progress
	$(VPY) scripts/prune_mnist.py --preset lenet5 --val-images 0 --overwrite --no-progress
	$(VPY) scripts/prune_mnist.py --model lenet300 --subset 2000 --test-subset 1000 --sens-n 1000 \
		--epochs 2 --rounds 2 --retrain-epochs 1 --no-figures --no-progress --overwrite \
		--out results/ci/lenet300-tiny
	$(VPY) scripts/readme_results.py

# The methods after Han on MNIST (results/methods.md): every method at 90 / 95 / 98% sparsity on
# both LeNets at one budget per model (LeNet-300-100 40 epochs, LeNet-5 2; hours on 2 cores),
# then the table with the papers' figures (results/methods/table.md, and results/methods.md's
# table). methods-quick: the same pipeline at CI budgets.
methods: venv
	$(VPY) scripts/methods_table.py --nm-24
	$(VPY) scripts/methods_table.py --table results/methods --into results/methods.md

methods-quick: venv
	$(VPY) scripts/methods_table.py --quick --models lenet300 --sparsities 0.9

# The ImageNet pipeline on a synthetic ImageFolder with 1/16-width nets: 1 process, then 2 ranks.
imagenet-smoke: venv
	rm -rf runs/alexnet-tiny runs/alexnet-caffe-tiny-ddp
	$(VPY) scripts/prune_imagenet.py --model alexnet --synthetic --tiny --out runs/alexnet-tiny
	$(VPY) -m torch.distributed.run --standalone --nproc_per_node 2 scripts/prune_imagenet.py \
		--model alexnet-caffe --synthetic --tiny --out runs/alexnet-caffe-tiny-ddp

test: venv
	$(VPY) -m pytest -q tests

lint: venv
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: venv
	$(VPY) -m ruff check --fix .
	$(VPY) -m ruff format .

# CPU benchmarks: sparse layers against their dense twins (same weights) and torch.nn.utils.prune,
# interleaved in one process, medians of per-repeat ratios; JSON under benchmarks/results/.
bench: venv
	$(VPY) benchmarks/bench_cpu_layers.py --out $(RESULTS)
	$(VPY) benchmarks/bench_cpu_block_sparse.py --out $(RESULTS)
	$(VPY) benchmarks/bench_cpu_sparse_conv.py --out $(RESULTS)
	$(VPY) benchmarks/bench_inference.py --out $(RESULTS)
	$(VPY) benchmarks/bench_cpu_sparse_train.py --out $(RESULTS)
	$(VPY) benchmarks/bench_epoch_lenet300.py --out $(RESULTS)

# The static performance contract, without a GPU: every kernel compiled for sm_90 and sm_80 as the
# JIT specialises it at its benchmark shape (registers, spills, shared memory, wgmma, overlap).
compile-check: venv
	TRITON_INTERPRET=0 $(VPY) -m sparsekern.ops._compile_check --json $(RESULTS)/compile_check.json

# On a GPU machine: every test without the interpreter, then the kernel benchmarks (JSON under
# benchmarks/results/). Uses the machine's own python3 and packages.
gpu-check:
	nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
	PYTHONPATH=. TRITON_INTERPRET=0 python3 -m pytest -q -x tests
	PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/bench_masked_linear.py --out $(RESULTS)
	PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/bench_block_sparse.py --quick --out $(RESULTS)
	PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/bench_conv.py --quick --out $(RESULTS)
	PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/bench_inference.py --gpu --out $(RESULTS)
	PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/bench_sparse_train_gpu.py --quick --out $(RESULTS)

# The whole sweeps (long): block-sparse linear (shapes x blocks 16-128 x densities 0.5-0.05) and
# every AlexNet / VGG-16 conv layer at batch 64 and 256.
gpu-bench-full:
	PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/bench_block_sparse.py --out $(RESULTS)
	PYTHONPATH=. TRITON_INTERPRET=0 python3 benchmarks/bench_conv.py --out $(RESULTS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks
