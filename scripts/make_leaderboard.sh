#!/usr/bin/env bash
# Regenerate the committed leaderboard of the embedded streams (results/LEADERBOARD.md,
# results/leaderboard.csv, results/leaderboard.tex, one picture per stream
# results/<stream>.png, and the block between the <!-- leaderboard:start/end --> markers
# of results/README.md and README.md):
#
#   1. every image method x seeds 0-4 on xtail-mini, each with its default settings (run
#      directories in results/runs/, not committed);
#   2. the held-out domain order emoji_things, clipart_food, digits, clipart_nature,
#      fashion_mnist on xtail-mini for moram, seq-lora and moe-lora x seeds 0-2 (its own
#      table, so that no conclusion rests on one domain order; run directories in
#      results/runs/heldout-order/);
#   3. the LLM stream trace-mini: every text method at seed 0, moram and seq-lora also at
#      seeds 1 and 2 (~17 min per run on 2 CPU cores);
#   4. the leaderboard over everything below results/.
#
# Hours of CPU in all. Interrupted? Run it again: finished runs are skipped, an unfinished
# one resumes.
#
# Usage (from anywhere):  scripts/make_leaderboard.sh [extra fit overrides ...]
#   e.g.                   scripts/make_leaderboard.sh trainer.accelerator=gpu
# Environment (comma lists; an empty ORDER_DOMAINS or TEXT_STREAMS skips that part):
#   PYTHON        default: .venv/bin/python if present, else python
#   METHODS       default: every registered image method     SEEDS       default: 0,1,2,3,4
#   STREAMS       default: xtail-mini
#   ORDER_DOMAINS default: [emoji_things,clipart_food,digits,clipart_nature,fashion_mnist]
#   ORDER_METHODS default: moram,seq-lora,moe-lora           ORDER_SEEDS default: 0,1,2
#   TEXT_STREAMS  default: trace-mini
#   TEXT_METHODS  default: every registered text method      TEXT_SEEDS  default: 0
#   TEXT_MORE_METHODS default: moram,seq-lora                TEXT_MORE_SEEDS default: 0,1,2
#   DRY_RUN=1     print each sweep's grid and run states, run nothing, write no leaderboard
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
methods_of() {  # registered methods that run on a modality (image or text)
  "$PYTHON" -c "import sys; from moram_bench import registry; registry.discover(); \
print(','.join(sorted(n for n, c in registry.METHODS.items() if sys.argv[1] in getattr(c, 'modalities', ()))))" "$1"
}
METHODS=${METHODS:-$(methods_of image)}
STREAMS=${STREAMS:-xtail-mini}
SEEDS=${SEEDS:-0,1,2,3,4}
ORDER_DOMAINS=${ORDER_DOMAINS-[emoji_things,clipart_food,digits,clipart_nature,fashion_mnist]}
ORDER_METHODS=${ORDER_METHODS:-moram,seq-lora,moe-lora}
ORDER_SEEDS=${ORDER_SEEDS:-0,1,2}
TEXT_STREAMS=${TEXT_STREAMS-trace-mini}
TEXT_SEEDS=${TEXT_SEEDS:-0}
TEXT_MORE_METHODS=${TEXT_MORE_METHODS:-moram,seq-lora}
TEXT_MORE_SEEDS=${TEXT_MORE_SEEDS:-0,1,2}
DRY=()
if [[ -n "${DRY_RUN:-}" ]]; then DRY=(--dry-run); fi

status=0
sweep() {  # sweep [--results DIR] key=value ... ; stops the script on a bad grid (2) or Ctrl-C (130)
  echo "make_leaderboard: sweep $*"
  local s=0
  "$PYTHON" -m moram_bench sweep "${DRY[@]}" "$@" trainer.enable_progress_bar=false "${EXTRA[@]}" || s=$?
  if [[ $s -eq 2 || $s -eq 130 || $s -eq 143 ]]; then
    exit "$s"  # the grid was invalid, or interrupted: nothing new to tabulate
  fi
  if [[ $s -ne 0 ]]; then status=$s; fi
}
EXTRA=("$@")

sweep "method=${METHODS}" "stream=${STREAMS}" "seed=${SEEDS}"
if [[ -n "$ORDER_DOMAINS" ]]; then
  # its own results root: the same method and seed as above, another domain order
  sweep --results results/runs/heldout-order "method=${ORDER_METHODS}" stream=xtail-mini \
    "stream.domains=${ORDER_DOMAINS}" "seed=${ORDER_SEEDS}"
fi
if [[ -n "$TEXT_STREAMS" ]]; then
  TEXT_METHODS=${TEXT_METHODS:-$(methods_of text)}
  sweep "method=${TEXT_METHODS}" "stream=${TEXT_STREAMS}" "seed=${TEXT_SEEDS}"
  if [[ -n "$TEXT_MORE_METHODS" ]]; then
    sweep "method=${TEXT_MORE_METHODS}" "stream=${TEXT_STREAMS}" "seed=${TEXT_MORE_SEEDS}"
  fi
fi
if [[ ${#DRY[@]} -gt 0 ]]; then
  exit "$status"
fi
# failed runs (status 1) are listed as unfinished in the leaderboard, never dropped
"$PYTHON" -m moram_bench leaderboard results --readme results/README.md --readme README.md
exit "$status"
