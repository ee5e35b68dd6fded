#!/usr/bin/env bash
# Runs studies one after another in the background of other work, and commits each study's
# results files (results.jsonl/.md/.png, base_config.json) within a minute of a run finishing, so
# that a machine lost mid-chain loses at most the runs in progress: the runner skips every run
# already in results.jsonl when the chain is started again.
#
#   mkdir -p runs && nohup bash studies/chain.sh --nice 10 ten_minutes scaling >> runs/chain.log 2>&1 &
#
# Each STUDY is studies/STUDY.py, written to studies/results/STUDY. --nice gives the trainers a
# lower priority than the session's own work (19: the lowest). --no-commit leaves git alone. The
# chain ends with the first study that fails or is interrupted (`pkill -TERM -f sove_jax.study`).
set -uo pipefail
cd "$(dirname "$0")/.."
nice_level=10
commit=1
studies=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nice) nice_level="$2"; shift 2 ;;
    --no-commit) commit=0; shift ;;
    -*) echo "studies/chain.sh: unknown option $1 (known: --nice N, --no-commit)." >&2; exit 2 ;;
    *) studies+=("$1"); shift ;;
  esac
done
if [ ${#studies[@]} -eq 0 ]; then
  echo "studies/chain.sh: name at least one study (a file studies/NAME.py)." >&2
  exit 2
fi
for s in "${studies[@]}"; do
  [ -f "studies/$s.py" ] || { echo "studies/chain.sh: no study file studies/$s.py." >&2; exit 2; }
done

commit_results() {  # $1: study name
  local out="studies/results/$1"
  [ "$commit" = 1 ] && [ -f "$out/results.jsonl" ] || return 0
  git add -A -- "$out"  # .gitignore keeps the workdirs out
  if ! git diff --cached --quiet -- "$out"; then
    # A record per finished run, and another when a stage is added to a finished run later.
    git commit -q -m "Study results as they come: $1 (lines in results.jsonl: $(wc -l < "$out/results.jsonl"))" \
      -- "$out" && echo "$(date -u +%FT%TZ) committed $out"
  fi
}

for s in "${studies[@]}"; do
  echo "$(date -u +%FT%TZ) chain: study $s starts (nice $nice_level)"
  nice -n "$nice_level" python -m sove_jax.study --arms="studies/$s.py" --out="studies/results/$s" &
  pid=$!
  polls=0
  while kill -0 "$pid" 2>/dev/null; do  # every 5 s, so that the chain moves on at once
    sleep 5; polls=$((polls + 1))
    [ $((polls % 12)) -eq 0 ] && commit_results "$s"  # each minute
  done
  wait "$pid"; rc=$?
  commit_results "$s"
  echo "$(date -u +%FT%TZ) chain: study $s ended with status $rc"
  [ "$rc" = 0 ] || exit "$rc"
done
