#!/usr/bin/env bash
# The paper's full CIFAR-10 protocols on this machine, resumable across sessions (issue 16).
#
# Usage: bash benchmarks/full_protocols.sh DATA_DIR [fig3] [fig2] [table1]
#
# fig3 / fig2: `proxoptim compare --preset ...` into runs/<name>-full (50 epochs, 45,000
#   images, every method of the preset). A run already begun is resumed from its last epoch
#   (`--resume`); a finished one (results.json written) is left alone. On the 2-core VM
#   fig3 took about 3.5 hours (docs/results.md). fig2 is estimated at about 12: per epoch,
#   90 steps of 0.87 s (backprop; ProxProp about 1.5 s) and the evaluation of 60,000 images
#   at 0.8 ms each. Each takes several sessions: rerun this script in each, in the
#   background, with nothing timed beside it.
# table1: `proxoptim sweep --preset table1` at the paper's width on 5,000 images for 6
#   epochs, into runs/table1-5000: estimated at 1.6 hours, the most that fits in about two.
#   Measured under nice on the 2-core VM (a first try at 10,000 images x 10 epochs): a
#   backprop step of the paper's MLP 0.87 s, and every epoch's evaluation of the training
#   subset, the 5,000 validation and the 10,000 test images 0.8 ms an image, so a cell at
#   10,000 x 10 took 450 s with backprop and the 36 cells about 4 hours. Resumed like a
#   compare run, left alone once sweep.json exists.
# Everything runs under `nice`. When a compare run has finished, merge and publish it with
#   proxoptim report runs/fig3-full --out docs/results/cifar-fig3-full
set -euo pipefail
data=${1:?"usage: bash benchmarks/full_protocols.sh DATA_DIR [fig3] [fig2] [table1]"}
shift
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(fig3 fig2 table1)
root=$(cd "$(dirname "$0")/.." && pwd)
case $data in /*) ;; *) data="$PWD/$data" ;; esac
cd "$root"

# Figure 2's ProxProp methods solve in backward (-bw, solve_in_backward=True): the same
# directions up to float32 rounding (tests/test_backward_solve.py), for about 30% less time
# a step on the paper's MLP (docs/performance.md, "Below the floor"), some 2 of its 12 hours.
# Figure 3's CNN has no layer that qualifies, so it keeps the preset's methods.
declare -A methods=([fig2]="--methods backprop,exact-bw,cg3-bw,cg5-bw,cg10-bw" [fig3]="")

# The run in OUT: left alone once it wrote DONE, resumed where it has a config.json,
# else started with the given flags.
run_or_resume() {  # SUBCOMMAND OUT DONE FLAGS...
    local command=$1 out=$2 done=$3
    shift 3
    if [ -f "$out/$done" ]; then
        echo "$out: finished"
    elif [ -f "$out/config.json" ]; then
        nice proxoptim "$command" --resume "$out" --quiet
    else
        nice proxoptim "$command" "$@" --data-dir "$data" --quiet --out "$out"
    fi
}

for step in "${steps[@]}"; do
    case $step in
        fig3 | fig2)
            # shellcheck disable=SC2086  # (the flags split into words on purpose)
            run_or_resume compare "runs/$step-full" results.json --preset "$step" ${methods[$step]}
            ;;
        table1)
            run_or_resume sweep runs/table1-5000 sweep.json --preset table1 \
                --train-subset 5000 --epochs 6
            ;;
        *) echo "unknown step $step (fig3, fig2 or table1)" >&2; exit 2 ;;
    esac
done
