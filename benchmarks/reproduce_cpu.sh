#!/usr/bin/env bash
# Every number in docs/results.md and docs/performance.md, regenerated on this machine's CPU
# (about 45 minutes on 2 cores). Run it on an otherwise idle machine: timings are shared.
# Usage: bash benchmarks/reproduce_cpu.sh [DATA_DIR]   (DATA_DIR defaults to ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
out=docs/results
mkdir -p "$out"

# Main job on digits (offline defaults) and the CG-iteration benchmark.
proxoptim compare --quiet --out "$out/digits-compare"
proxoptim sweep --quiet --out "$out/digits-table1"
python benchmarks/cg_iterations.py | tee "$out/digits-cg-iterations.md"

# Reduced paper protocols on CIFAR-10 (the shared JPEG copy).
proxoptim compare --preset fig2 --data-dir "$data" --train-subset 5000 --epochs 10 --width 0.25 \
    --quiet --out "$out/cifar-fig2-reduced"
proxoptim compare --preset fig3 --data-dir "$data" --train-subset 5000 --epochs 10 \
    --quiet --out "$out/cifar-fig3-reduced"
proxoptim sweep --preset table1 --data-dir "$data" --train-subset 2000 --epochs 5 --width 0.25 \
    --quiet --out "$out/cifar-table1-reduced"
python benchmarks/cg_iterations.py --dataset cifar10 --data-dir "$data" --train-subset 5000 \
    --epochs 5 --width 0.25 --batch-size 500 | tee "$out/cifar-cg-iterations.md"

# Step time and memory against backprop on the paper's networks (docs/performance.md).
python benchmarks/targets.py --repeats 9 | tee "$out/targets-cpu.md"
python benchmarks/dual_budget.py --repeats 15 | tee "$out/dual-budget-cpu.md"
python benchmarks/profile_step.py | tee "$out/profile-mlp-cg3.md"
python benchmarks/conv_gram_cost.py | tee "$out/conv-gram-cost.md"
python benchmarks/dual_cg_block.py --processes 8 | tee "$out/dual-cg-block.md"
python benchmarks/step_ratio.py --network resnet18 --optimizer adam --batch-size 128 \
    --methods cg3,exact | tee "$out/resnet18-cifar-step-ratio.md"
python benchmarks/profile_step.py --network cnn --optimizer adam --method cg3 \
    | tee "$out/profile-cnn-cg3.md"

# Memory of an exact step on a wide network (docs/reliability.md).
python benchmarks/resnet_exact_memory.py --batch-size 32 | tee "$out/resnet18-exact-memory.md"
