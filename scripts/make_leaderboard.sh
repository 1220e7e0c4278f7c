#!/usr/bin/env bash
# Regenerate the committed leaderboard of the embedded streams (results/LEADERBOARD.md,
# results/leaderboard.csv, results/leaderboard.tex, and the block between the
# <!-- leaderboard:start/end --> markers of results/README.md and README.md):
#
#   1. a sweep of every image method x seeds 0,1,2 on xtail-mini, with each method's
#      default settings (run directories in results/runs/, not committed);
#   2. a sweep of the LLM stream trace-mini (TEXT_METHODS x TEXT_SEEDS; ~17 min per run
#      on 2 CPU cores, so by default moram and seq-lora, seed 0);
#   3. the leaderboard over everything below results/.
#
# Interrupted? Run it again: finished runs are skipped, an unfinished one resumes.
#
# Usage (from anywhere):  scripts/make_leaderboard.sh [extra fit overrides ...]
#   e.g.                   scripts/make_leaderboard.sh trainer.accelerator=gpu
# Environment:             PYTHON (default: .venv/bin/python if present, else python),
#                          METHODS (comma list; default: every registered image method),
#                          STREAMS (default: xtail-mini), SEEDS (default: 0,1,2),
#                          TEXT_STREAMS (default: trace-mini; empty: skip), TEXT_METHODS
#                          (default: moram,seq-lora), TEXT_SEEDS (default: 0)
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if [[ -z "${METHODS:-}" ]]; then
  METHODS=$("$PYTHON" -c "from moram_bench import registry; registry.discover(); \
print(','.join(sorted(n for n, c in registry.METHODS.items() if 'image' in getattr(c, 'modalities', ()))))")
fi
STREAMS=${STREAMS:-xtail-mini}
SEEDS=${SEEDS:-0,1,2}

echo "make_leaderboard: methods ${METHODS}; streams ${STREAMS}; seeds ${SEEDS}"
status=0
"$PYTHON" -m moram_bench sweep "method=${METHODS}" "stream=${STREAMS}" "seed=${SEEDS}" \
  trainer.enable_progress_bar=false "$@" || status=$?
if [[ $status -eq 2 || $status -eq 130 ]]; then
  exit "$status"  # the grid was invalid, or interrupted: nothing new to tabulate
fi
TEXT_STREAMS=${TEXT_STREAMS-trace-mini}
if [[ -n "$TEXT_STREAMS" ]]; then
  TEXT_METHODS=${TEXT_METHODS:-moram,seq-lora}
  TEXT_SEEDS=${TEXT_SEEDS:-0}
  echo "make_leaderboard: methods ${TEXT_METHODS}; streams ${TEXT_STREAMS}; seeds ${TEXT_SEEDS}"
  tstatus=0
  "$PYTHON" -m moram_bench sweep "method=${TEXT_METHODS}" "stream=${TEXT_STREAMS}" "seed=${TEXT_SEEDS}" \
    trainer.enable_progress_bar=false "$@" || tstatus=$?
  if [[ $tstatus -eq 2 || $tstatus -eq 130 ]]; then
    exit "$tstatus"
  fi
  if [[ $tstatus -ne 0 ]]; then status=$tstatus; fi
fi
# failed runs (status 1) are listed as unfinished in the leaderboard, never dropped
"$PYTHON" -m moram_bench leaderboard results --readme results/README.md --readme README.md
exit "$status"
