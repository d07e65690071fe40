#!/usr/bin/env bash
# SFT on the GRPO runs' terms: one full epoch of the fit set (fit.jsonl, GSM8K train's first 6,973 rows;
# 108 steps of 64 = 6,912 rows, the last partial batch dropped as GRPO drops its own), run as `--steps 108`
# of the default 3-epoch schedule: 16 warmup steps, then constant, the treatment of the GRPO runs it is
# compared with (`--steps 116` of their 3-epoch schedule: 17 warmup steps, then constant).
#   select  SFT at BUDGETS x LRS (seed 0, all at once), then the selection set (select.jsonl, GSM8K train's
#           last 500 rows, never trained on; greedy, 512 new tokens) for every adapter not yet scored
#   edge    where the largest lr of LRS wins a budget (analyze.chosen: strict, math-verify breaking ties),
#           the ladder's next lr (1e-4 1e-3 3e-3 1e-2 3e-2) at that budget, then its selection score; one
#           step only, so a second call trains nothing new and scores what the first left unscored
#   chosen  the GSM8K test (1,319, greedy, 1,024 new tokens) for the seed-0 run of each column's choice per
#           budget (strict's rule, and math-verify alone)
#   loose   the test for the 30-step adapters here (runs/sel-*) that either column prefers, never tested
#   seeds   per budget the chosen lr: seeds 1-2 at p13, seed 1 elsewhere (seed 0 is the selection run);
#           meanwhile chosen and loose; then the test for every seed
#   all     select; then the budgets at the edge run edge and then seeds while the others run seeds; then
#           seeds once more for any evaluation a vLLM start missed (timeline.txt: seconds since the start)
# BUDGETS limits every stage to those budgets (select, edge, chosen and seeds); chosen*.txt hold every budget.
# Two evaluations may run at once in `all` (each engine takes EVAL_GPU of the GPU, beside the runs).
# Every stage skips what is done (a run whose metrics reach step STEPS, an adapter already scored on
# that set), continues a run stopped with its state saved (Ctrl-C or SIGTERM to train_sft.py: --resume)
# and refuses to train over any other unfinished run folder. Relative paths are taken from where it runs.
# Measured (one H100, torch 2.11, bf16, Qwen2.5-Coder-1.5B-Instruct, CKPT=always MICRO=4096, 2026-12-07): the
# select stage's 9 runs side by side held 8.5-8.8 GiB each (nvidia-smi) at ~5-7 s of wall per step
# each (~10 minutes for the 108 steps); a 500-row selection evaluation takes 3-8 s per adapter on one engine,
# a 1,319-row test 12-46 s. `all` after the select stage (EVAL_GPU=0.22): 12 minutes (edge at one budget,
# four seed runs, ten test evaluations).
# usage: one_epoch.sh MODEL DATA_DIR OUT STAGE   (DATA_DIR holds fit.jsonl, select.jsonl and test.jsonl)
# Run names: ep1-sel-<budget>-lr<lr> (seed 0), ep1-<budget>-lr<lr>-seed<s>; analyze.py reads them as
# "SFT, 1 epoch" beside the 30-step runs.
set -uo pipefail; shopt -s nullglob  # a glob that matches nothing is no word
[ $# = 4 ] || { echo "usage: one_epoch.sh MODEL DATA_DIR OUT select|edge|chosen|loose|seeds|all" >&2; exit 2; }
MODEL=$1; D=$2; OUT=$3; STAGE=$4
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
OLD=${OLD:-$HERE}  # the 30-step runs: runs/sel-*, select/summary.jsonl, test/
for f in fit select test; do [ -f $D/$f.jsonl ] || { echo "one_epoch.sh: no $D/$f.jsonl" >&2; exit 2; }; done
mkdir -p $OUT/runs $OUT/select $OUT/test || exit 2
abs() { [ -e "$1" ] && echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")" || echo "$1"; }  # a hub id stays
MODEL=$(abs $MODEL); D=$(abs $D); OUT=$(abs $OUT); OLD=$(abs $OLD)  # the commands run from the project root
STEPS=${STEPS:-108}; BUDGETS=${BUDGETS:-p13 p196 p2548}; LRS=${LRS:-1e-4 1e-3 3e-3}
MICRO=${MICRO:-4096}; CKPT=${CKPT:-always}; EVAL_GPU=${EVAL_GPU:-0.22}  # an engine's share: two may run beside 4 runs in `all`
SETTLE=${SETTLE:-60}  # s for the runs' memory to settle before an engine measures what is free
SFT_EXTRA=${SFT_EXTRA:-}; EVAL_EXTRA=${EVAL_EXTRA:-}  # more flags (the CPU check's)
declare -A BUDGET=([p1]="--u 1" [p13]="--u 13" [p196]="--u 1 --n-tie 1" [p2548]="--u 13 --n-tie 1" [p12544]="--u 64 --r 8 --n-tie 1")
T0=${T0:-$(date +%s)}; export T0

done_run() { tail -n 1 $OUT/runs/$1/metrics.jsonl 2>/dev/null | grep -q "\"step\": $STEPS,"; }
sft() {  # name budget lr seed: a new run, or the rest of one stopped with its state saved (Ctrl-C, SIGTERM)
  done_run $1 && return 0
  if [ -e $OUT/runs/$1 ]; then
    [ -f $OUT/runs/$1/trainer_state.pt ] || { echo "one_epoch.sh: $OUT/runs/$1 holds an unfinished run with no saved state; move it away" >&2; return 1; }
    (cd $ROOT && python train_sft.py --resume $OUT/runs/$1) >> $OUT/runs/$1.log 2>&1
  else
    (cd $ROOT && python train_sft.py --model $MODEL --data $D/fit.jsonl --batch 64 --micro-tokens $MICRO \
      --grad-ckpt $CKPT --save-every 0 ${BUDGET[$2]} --lr $3 --seed $4 --steps $STEPS $SFT_EXTRA \
      --run-dir $OUT/runs/$1) > $OUT/runs/$1.log 2>&1
  fi || echo "one_epoch.sh: $1 failed (its log: $OUT/runs/$1.log)" >&2
}
scored() { grep -q "\"name\": \"$2\"" $OUT/$1/summary.jsonl 2>/dev/null || ls $OLD/$1/$2.jsonl.gz > /dev/null 2>&1; }
evaluate() {  # select|test adapters...: those not yet scored on that set, on one engine
  local set=$1 tokens=512 todo=(); shift; [ $set = test ] && tokens=1024
  for a in "$@"; do scored $set $(basename $(dirname $a)) || todo+=($a); done
  [ ${#todo[@]} = 0 ] && return 0
  (cd $ROOT && python tools/eval_many.py --model $MODEL --data $D/$set.jsonl --out-dir $OUT/$set \
    --max-new-tokens $tokens --gpu-memory-utilization $EVAL_GPU $EVAL_EXTRA "${todo[@]}") >> $OUT/$set.log 2>&1 \
    || echo "one_epoch.sh: an evaluation on $set failed (its log: $OUT/$set.log)" >&2
}
chosen() {  # summary prefix column: "budget lr" per budget (column strict: the protocol's rule)
  PYTHONPATH=$HERE python -c "import analyze, sys
for b, lr in sorted(analyze.chosen(sys.argv[1], sys.argv[2], sys.argv[3]).items()): print(b, lr)" $1 $2 $3
}
mine() { while read b lr; do [[ " $BUDGETS " == *" $b "* ]] && echo $b $lr; done; }  # choices in BUDGETS
edges() {  # "budget lr": the ladder's next lr where strict chooses the largest lr of LRS
  while read b lr; do
    [ "$lr" = "${LRS##* }" ] && echo 1e-4 1e-3 3e-3 1e-2 3e-2 | tr ' ' '\n' | awk -v b=$b -v t=$lr 'f {print b, $1; exit} $1 == t {f = 1}'
  done < <(chosen $OUT/select/summary.jsonl ep1-sel- strict | mine)
}
mark() { echo "$1 $(( $(date +%s) - T0 )) s" | tee -a $OUT/timeline.txt; }
runs_of() { for a in "$@"; do done_run $(basename $(dirname $a)) && echo $a; done; }

case $STAGE in
select)
  for b in $BUDGETS; do for lr in $LRS; do sft ep1-sel-$b-lr$lr $b $lr 0 & sleep 3; done; done; wait
  evaluate select $(runs_of $OUT/runs/ep1-sel-*/adapter.safetensors)
  mark "select: $BUDGETS x $LRS" ;;
edge)
  next=$(edges | tr ' ' : | xargs)
  for x in $next; do sft ep1-sel-${x%:*}-lr${x#*:} ${x%:*} ${x#*:} 0 & sleep 3; done; wait
  evaluate select $(runs_of $OUT/runs/ep1-sel-*/adapter.safetensors)
  mark "edge: ${next:-none}" ;;
loose)
  evaluate test $([ -f $OLD/select/summary.jsonl ] && for c in strict math_verify; do chosen $OLD/select/summary.jsonl sel- $c; done \
                  | sort -u | while read b lr; do ls $OLD/runs/sel-$b-lr$lr/adapter.safetensors; done)
  mark "loose ends: the 30-step runs' test" ;;
chosen)
  chosen $OUT/select/summary.jsonl ep1-sel- strict > $OUT/chosen.txt
  chosen $OUT/select/summary.jsonl ep1-sel- math_verify > $OUT/chosen-math-verify.txt
  evaluate test $(cat $OUT/chosen.txt $OUT/chosen-math-verify.txt | sort -u | mine \
                  | while read b lr; do ls $OUT/runs/ep1-sel-$b-lr$lr/adapter.safetensors; done)
  mark "the chosen runs' test" ;;
seeds)
  chosen $OUT/select/summary.jsonl ep1-sel- strict > $OUT/chosen.txt
  [ -s $OUT/chosen.txt ] || { echo "one_epoch.sh: nothing chosen yet; run the select stage first" >&2; exit 1; }
  while read b lr; do
    seeds=1; [ $b = p13 ] && seeds="1 2"
    for s in $seeds; do sft ep1-$b-lr$lr-seed$s $b $lr $s & sleep 3; done
  done < <(mine < $OUT/chosen.txt)
  sleep $SETTLE  # vLLM measures free memory at its start: let the runs reach their peak first
  bash $0 $MODEL $D $OUT chosen; bash $0 $MODEL $D $OUT loose
  wait
  evaluate test $(runs_of $OUT/runs/ep1-p*-seed*/adapter.safetensors)
  mark "seeds' test" ;;
all)
  S="bash $0 $MODEL $D $OUT"
  $S select
  at=$(edges | cut -d ' ' -f 1 | xargs); rest=$(for b in $BUDGETS; do [[ " $at " == *" $b "* ]] || echo $b; done | xargs)
  [ -n "$at" ] && { BUDGETS="$at" $S edge; BUDGETS="$at" $S edge; BUDGETS="$at" $S seeds; } &
  [ -n "$rest" ] && BUDGETS="$rest" $S seeds
  wait; SETTLE=0 $S seeds ;;
*) echo "one_epoch.sh: STAGE is select, edge, chosen, loose, seeds or all" >&2; exit 2 ;;
esac
