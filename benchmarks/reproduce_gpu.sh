#!/usr/bin/env bash
# Reproduce the original image studies (../shared/seeds/) at their full budgets on one GPU.
#
#   BENCH_DATA=/path/to/data bash benchmarks/reproduce_gpu.sh [OUT]
#   SMOKE=1 DEVICE=cpu bash benchmarks/reproduce_gpu.sh   # the whole script at each task's
#                  # smoke budget (minutes, any machine), into leaderboards/reproduce-smoke
# PYTHON names the interpreter that has bench installed (default: python).
#
# Every variant runs its report's settings (search_spaces/*.yaml, `bench list` prints them)
# over 3 seeds; WORKERS processes share each study (a journal file), so several small
# trials share the device. Fashion-MNIST and CIFAR-10 are used when they are under
# $BENCH_DATA, else MNIST stands in (the machines lent so far cannot download). Then the
# boards (with the reports' numbers and findings), the paired comparisons, the figures and
# one HTML report per task.
#
# Expected time on one H100/H200-class GPU with WORKERS=4 (estimates from the CPU
# throughput in benchmarks/RESULTS.md, not yet measured): vae studies ~1 h, priors ~1 h,
# simsiam ablations (2 x 12 ResNet-18 trials x 100 epochs) ~8 h. Each study resumes where it
# stopped when the script is run again.
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=${SMOKE:-0}
DEFAULT_OUT=leaderboards/reproduce; [ "$SMOKE" = 1 ] && DEFAULT_OUT=leaderboards/reproduce-smoke
OUT=${1:-$DEFAULT_OUT}
PYTHON=${PYTHON:-python}
WORKERS=${WORKERS:-4}
DEVICE=${DEVICE:-cuda}
export BENCH_NO_DOWNLOAD=${BENCH_NO_DOWNLOAD:-1}

have() {  # a torchvision data set folder under $BENCH_DATA
  [ -n "${BENCH_DATA:-}" ] && [ -d "$BENCH_DATA/$1" ]
}
FASHION=mnist; have FashionMNIST && FASHION=fashion-mnist
CIFAR=mnist; have cifar-10-batches-py && CIFAR=cifar10
echo "priors on $FASHION, simsiam on $CIFAR (the reports: fashion-mnist, cifar10)"

SMOKE_ARG=(); SUFFIX=""
if [ "$SMOKE" = 1 ]; then SMOKE_ARG=(--smoke); SUFFIX=.smoke; fi

run() {  # bench run TASK --variant V [--set ...], timed
  local t0=$SECONDS
  bench run "$@" ${SMOKE_ARG[@]+"${SMOKE_ARG[@]}"} --device "$DEVICE" --workers "$WORKERS" --quiet --out "$OUT"
  echo "$(date -u +%FT%TZ) $* : $((SECONDS - t0)) s"
}

# vae: report 000 (beta-VAE), 001 (AE vs VAE, beta study), 004 (MC vs analytic KL, the bar)
run vae --variant beta-vae-000
run vae --variant ae-vs-vae-001
run vae --variant vae-beta-001
run vae --variant kl-estimator-004
run vae --variant elbo-bar
# report 001's VAE at its own 20 epochs beside its AE's 10 (a second study of the variant)
run vae --variant ae-vs-vae-001 --set epochs=20 --study "vae.ae-vs-vae-001.e20$SUFFIX"

# priors: report 002 (AD and VADs with Normal, Laplace and Uniform latents)
run priors --variant decoders-002 --set dataset="$FASHION"

# simsiam: report 004 (stop-gradient and predictor ablations, 100 epochs)
# (ablation: the paper's projector; ablation-plain-projector: no BN at its output, where
# the identity predictor collapses on the CPU budget: benchmarks/RESULTS.md)
for v in ablation ablation-plain-projector; do
  if [ "$CIFAR" = cifar10 ]; then
    run simsiam --variant "$v"
  else  # MNIST stand-in: the CIFAR ResNet-18 takes 1-channel 28x28 images as they are
    run simsiam --variant "$v" --set dataset=mnist
  fi
done

studies() {  # the studies of task $1 under $OUT, one a line
  "$PYTHON" - "$OUT" "$1" <<'PY'
import sys
from bench import leaderboard
rows = leaderboard.read_trials(sys.argv[1], sys.argv[2])
print("\n".join(sorted(rows["study"].unique())) if len(rows) else "")
PY
}

for task in vae priors simsiam; do
  bench board "$task" --out "$OUT" --format markdown > "$OUT/$task.board.md"
  : > "$OUT/$task.compare.txt"
  list=$(studies "$task")  # an assignment: a failure here stops the script (set -e)
  [ -n "$list" ] || { echo "no studies of $task under $OUT" >&2; exit 1; }
  for study in $list; do  # paired comparisons of each study's configurations
    bench compare "$task" --study "$study" --out "$OUT" >> "$OUT/$task.compare.txt"
  done
  bench plot "$task" --out "$OUT" > /dev/null
  bench report "$task" --out "$OUT"
done
echo "boards, comparisons, figures and reports under $OUT"
