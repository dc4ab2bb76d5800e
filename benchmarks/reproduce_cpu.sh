#!/usr/bin/env bash
# Every number in docs/results.md, regenerated on this machine's CPU (about an hour on 2 cores).
# Usage: bash benchmarks/reproduce_cpu.sh [DATA_DIR]   (DATA_DIR defaults to ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
out=docs/results
mkdir -p "$out"

proxoptim compare --quiet --out "$out/digits-compare"
proxoptim sweep --quiet --out "$out/digits-table1"
python benchmarks/cg_iterations.py | tee "$out/digits-cg-iterations.md"

proxoptim compare --preset fig2 --data-dir "$data" --train-subset 5000 --epochs 10 --width 0.25 \
    --quiet --out "$out/cifar-fig2-reduced"
proxoptim compare --preset fig3 --data-dir "$data" --train-subset 5000 --epochs 10 \
    --quiet --out "$out/cifar-fig3-reduced"
proxoptim sweep --preset table1 --data-dir "$data" --train-subset 2000 --epochs 5 --width 0.25 \
    --quiet --out "$out/cifar-table1-reduced"

python benchmarks/step_ratio.py --methods cg1,cg3,cg5,cg10,exact | tee "$out/step-ratio-mlp.md"
python benchmarks/step_ratio.py --network cnn --optimizer adam --methods cg1,cg3,cg5,cg10 \
    | tee "$out/step-ratio-cnn.md"
