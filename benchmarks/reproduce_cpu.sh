#!/usr/bin/env bash
# Every number in docs/results.md and docs/performance.md, regenerated on this machine's CPU.
# Run it on an otherwise idle machine: timings are shared. It prints how long it took at the
# end and writes that to docs/results/reproduce-cpu-time.md.
#
# Usage: bash benchmarks/reproduce_cpu.sh [DATA_DIR]      (or DATA_DIR=... bash ...)
#   DATA_DIR: where CIFAR-10 is: a folder holding the official cifar-10-batches-py, an
#   ImageFolder tree or a tar archive of either, or the archive itself (see
#   proxoptim.experiments.data.load_cifar10). Relative paths are taken from the directory
#   the script is started in; default: data/ in the checkout.
set -euo pipefail
SECONDS=0
root=$(cd "$(dirname "$0")/.." && pwd)
data=${1:-${DATA_DIR:-$root/data}}
case $data in /*) ;; *) data="$PWD/$data" ;; esac
cd "$root"
out=docs/results
mkdir -p "$out"

if [ ! -e "$data" ]; then
    echo "reproduce_cpu.sh: no CIFAR-10 at $data." >&2
    echo "Pass where it is as the first argument or as DATA_DIR (a folder with" >&2
    echo "cifar-10-batches-py, an ImageFolder tree or a tar archive of either), e.g." >&2
    echo "    bash benchmarks/reproduce_cpu.sh ~/datasets/cifar10" >&2
    exit 2
fi
# Fail now, not after the digits runs, if CIFAR-10 cannot be read there (this also decodes
# the images into the cache the runs below read).
python -c 'import sys; from proxoptim.experiments.data import DatasetError, load_cifar10
try:
    load_cifar10(sys.argv[1], progress=False)
except DatasetError as error:
    sys.exit(f"reproduce_cpu.sh: {error}")' "$data"
# The code this run starts from: the runs below rewrite tracked files under docs/results, so
# a provenance line taken at the end would always read "dirty".
started=$(python -c 'import sys; from proxoptim.experiments.provenance import provenance_comment
print(provenance_comment(sys.argv[1]))' "bash benchmarks/reproduce_cpu.sh $data")

# Main job on digits (offline defaults) and the CG-iteration benchmark.
proxoptim compare --quiet --out "$out/digits-compare"
proxoptim sweep --quiet --out "$out/digits-table1"
python benchmarks/cg_iterations.py | tee "$out/digits-cg-iterations.md"

# Reduced paper protocols on CIFAR-10.
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

elapsed=$SECONDS
{
    echo "$started"
    echo
    printf 'bash benchmarks/reproduce_cpu.sh took %d min %02d s (%d s).\n' \
        $((elapsed / 60)) $((elapsed % 60)) "$elapsed"
} | tee "$out/reproduce-cpu-time.md"
