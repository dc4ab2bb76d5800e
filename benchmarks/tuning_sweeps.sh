#!/usr/bin/env bash
# The τθ × lr grids behind docs/tuning.md, written to docs/results/tuning/<grid>/ (table.md,
# sweep.json, sweep.png, heatmap.png). A grid whose sweep.json exists is skipped, so an
# interrupted run continues where it stopped (delete a folder to redo it).
#
# Usage: bash benchmarks/tuning_sweeps.sh [DATA_DIR]     (CIFAR-10, as for reproduce_cpu.sh;
#        the digits grids need nothing). About 50 minutes on 2 CPU cores.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
data=${1:-${DATA_DIR:-$root/data}}
case $data in /*) ;; *) data="$PWD/$data" ;; esac
cd "$root"
out=docs/results/tuning
mkdir -p "$out"

grid() {  # grid NAME FLAGS...
    local name=$1
    shift
    if [ -e "$out/$name/sweep.json" ]; then
        echo "tuning_sweeps.sh: $out/$name done, skipped"
        return
    fi
    proxoptim sweep --quiet --out "$out/$name" "$@"
}

# Digits, the main job's MLP (64-400-100-400-10), Nesterov SGD: where ProxProp's lr·τθ
# meets backprop's lr, and how far past backprop's stable lr it stays stable.
grid digits-mlp-nesterov --methods backprop,cg3,exact --epochs 20 \
    --lrs 10,3,1,0.3,0.1,0.03,0.01 --tau-proxes 0.003,0.01,0.03,0.1,0.3,1,3
# Digits, the paper's CNN (width 1: the sweep's default is the digits MLP's 0.1) on 8×8
# images, Adam.
grid digits-cnn-adam --width 1 --model cnn --optimizer adam --methods backprop,cg3 \
    --epochs 10 --lrs 0.03,0.01,0.003 --tau-proxes 0.1,1,10
# The batch size: under the sum convention M = I/τθ + Σ over the batch, so the direction's
# shape depends on τθ·B. With Adam (blind to the direction's scale) the best τθ should
# move as 1/B.
for batch in 25 100 400; do
    grid "digits-mlp-adam-batch$batch" --optimizer adam --methods exact --epochs 20 \
        --batch-size "$batch" --lrs 0.01,0.003,0.001 \
        --tau-proxes 0.001,0.003,0.01,0.03,0.1,0.3,1,3,10
done
# Reduced CIFAR-10 (5,000 training images, 10 epochs, batch 500 as in the paper): the MLP
# at width 0.25 with Nesterov SGD, and the paper's CNN (width 1: the sweep's default is the
# digits MLP's 0.1) with Adam.
cifar=(--dataset cifar10 --data-dir "$data" --train-subset 5000 --epochs 10 --batch-size 500)
grid cifar-mlp-nesterov "${cifar[@]}" --width 0.25 --methods backprop,cg3 \
    --lrs 3,1,0.3,0.1,0.03 --tau-proxes 0.01,0.05,0.2,1
grid cifar-cnn-adam "${cifar[@]}" --width 1 --model cnn --optimizer adam --methods backprop,cg3 \
    --lrs 0.003,0.001,0.0003 --tau-proxes 0.1,1,10
