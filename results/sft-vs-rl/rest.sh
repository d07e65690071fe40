#!/usr/bin/env bash
# What the protocol still lacks, in the order the device time should go. On a GPU (one H100, 2026-12-07):
# grpo-more (EVAL_GPU=0.3: GPU=0.15 until two runs were stopped with their state saved, then GPU=0.2, which
# continued them with --resume; all three runs and their tests), then grpo-select and grpo-edge over two
# sessions (GPU=0.12 AT_MOST=4 EVAL_GPU=0.3; in the first, engines started 45 s apart and the two started
# first refused twice, beside the others' starts; in the second, runs started one at a time; four runs at
# once held 60 GiB by nvidia-smi, ~15 GiB a run at 0.12; two stopped runs continued). The first four stages
# ran end to end on a 2-core CPU with the tiny model (tests/tiny.py, its max_position_embeddings raised to
# 4096; 224 rows to fit, 32 to select), 2026-12-06, in 50 / 47 / 112 / 62 s, with STEPS=2 GSTEPS=2 EPOCH=2
# GAP=3 GPU=0.05 EVAL_GPU=0.1 SFT_EXTRA="--batch 8" GRPO_EXTRA="--prompts-per-step 4 --mini-batch 2
# --max-new-tokens 32 --max-model-len 512" EVAL_EXTRA="--max-new-tokens 32" VLLM_ENABLE_V1_MULTIPROCESSING=0
# (tests/test_rest_sh.py runs sft-finals so, with STEPS=1, from outside the project, twice, and
# grpo-more with RSTEPS=2). Runs start one at a time: each once the one before has logged a step.
#   sft-edge     SFT at lr 1e-2 (the grid's next step: 3e-3 won at every budget), seed 0, 30 steps, five
#                budgets; the selection set for the five adapters
#   sft-finals   per budget the lr the selection set chooses among all SFT lrs (strict, then math-verify):
#                seeds 1-2 at 13 parameters, seed 1 elsewhere (seed 0 is the selection run), 30 steps;
#                the GSM8K test for every run at the chosen lrs not tested yet
#   grpo-select  GRPO at 13 and 196 parameters, lr 5e-5 / 1e-4 / 2e-4, seed 0, GSTEPS steps of one epoch's
#                schedule, AT_MOST at once (each takes GPU's share of the GPU and ~5.5 GiB more: four at
#                GPU=0.12 held 60 GiB of an H100 by nvidia-smi); the selection set; OUT/chosen-grpo.txt
#   grpo-edge    per budget whose choice is the lowest or highest of LRS: the next lr past it (EDGES: 2e-5
#                below, 5e-4 above), as grpo-select runs; the selection set; the choice among all, again
#   grpo-seeds   GRPO at 13 parameters at the chosen lr, one epoch (EPOCH steps), seeds 0-2; the GSM8K test
#                (named grpo-ep1-...: fit set and one-epoch schedule, not the committed runs' recipe)
#   grpo-more    GRPO with the recipe of results/qwen-coder-1.5b's runs (all 7,473 train rows: fit.jsonl then
#                select.jsonl, as OUT/train.jsonl; lr 1e-4; `--steps 116` of the default 3-epoch schedule),
#                MORE="budget:seed ..." (seed 1 at 196 and 2,548, seed 0 at 12,544); the GSM8K test
# Every selection evaluation is greedy, 512 new tokens, on select.jsonl (GSM8K train's last 500 rows, never
# trained on); every test evaluation greedy, 1,024 new tokens, all 1,319 rows.
# It runs from any directory (the trainers and tools by their path here; MODEL, DATA_DIR and OUT as given,
# relative to where it is run). A stage rerun does only what is missing: a run whose metrics reach its last
# step is skipped (its folder and log left alone), an adapter already scored on a set (its name in that
# set's summary.jsonl, or a committed <name>.jsonl.gz) is not scored again. A run stopped with its state
# saved (Ctrl-C or SIGTERM to the trainer, or a shorter run) is continued to its last step with --resume,
# its log appended; a run folder holding any other unfinished run is never trained over: one line names
# it. A run or an evaluation that fails is one line naming its log; the others go on, and the stage exits
# 1. A stage that needs a choice not made yet (no selection summary, no chosen-grpo.txt) is one line,
# exit 1, before anything starts; bad usage, exit 2.
# usage: rest.sh MODEL DATA_DIR OUT STAGE   (DATA_DIR and OUT as protocol.sh's; OUT holds runs/, select/, test/)
set -uo pipefail
STAGES="sft-edge, sft-finals, grpo-select, grpo-edge, grpo-seeds or grpo-more"
[ $# = 4 ] || { echo "usage: rest.sh MODEL DATA_DIR OUT STAGE (STAGE: $STAGES)" >&2; exit 2; }
MODEL=$1; D=$2; OUT=$3; STAGE=$4
case $STAGE in
sft-edge|sft-finals|grpo-select|grpo-edge|grpo-seeds|grpo-more) ;;
*) echo "usage: rest.sh MODEL DATA_DIR OUT STAGE (STAGE is $STAGES, not '$STAGE')" >&2; exit 2 ;;
esac
AT_MOST=${AT_MOST:-4}  # grpo-select's and grpo-edge's runs at once
[[ $AT_MOST =~ ^[1-9][0-9]*$ ]] || { echo "rest.sh: AT_MOST must be a whole number >= 1, not '$AT_MOST'" >&2; exit 2; }
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)  # the trainers and tools, by path
for f in fit select test; do [ -f "$D/$f.jsonl" ] || { echo "rest.sh: no $D/$f.jsonl (DATA_DIR)" >&2; exit 2; }; done
mkdir -p "$OUT/runs" "$OUT/select" "$OUT/test" || exit 2
STEPS=${STEPS:-30}; GSTEPS=${GSTEPS:-40}; EPOCH=${EPOCH:-108}; LRS=${LRS:-5e-5 1e-4 2e-4}; EDGES=${EDGES:-2e-5 5e-4}
RSTEPS=${RSTEPS:-116}; MORE=${MORE:-p196:1 p2548:1 p12544:0}  # grpo-more: the steps and runs of that recipe
GPU=${GPU:-0.12}; EVAL_GPU=${EVAL_GPU:-0.5}; GAP=${GAP:-45}  # seconds before a failed start is tried again
SFT_EXTRA=${SFT_EXTRA:-}; GRPO_EXTRA=${GRPO_EXTRA:-}; EVAL_EXTRA=${EVAL_EXTRA:-}  # more flags (the CPU check's)
declare -A BUDGET=([p1]="--u 1" [p13]="--u 13" [p196]="--u 1 --n-tie 1" [p2548]="--u 13 --n-tie 1" [p12544]="--u 64 --r 8 --n-tie 1")
FAILED=0  # a run or an evaluation failed or was refused: the stage exits 1
PIDS=(); RUNS=()  # the runs started in the background, and their names

done_run() {  # name steps: its metrics' last line is step `steps` and its adapter is there
  [ -f "$OUT/runs/$1/adapter.safetensors" ] \
    && tail -n 1 "$OUT/runs/$1/metrics.jsonl" 2>/dev/null | grep -q "\"step\": $2,"
}
logged() { [ -f "$OUT/runs/$1/metrics.jsonl" ] && wc -l < "$OUT/runs/$1/metrics.jsonl" || echo 0; }  # steps logged
attempt() {  # name steps python script args...: one try, its output appended to runs/<name>.log: a new run,
             # or python script --resume of one with its state saved short of step `steps`
  local name=$1 steps=$2; shift 2
  [ -f "$OUT/runs/$name/trainer_state.pt" ] && set -- "$1" "$2" --resume "$OUT/runs/$name" --steps "$steps"
  "$@" >> "$OUT/runs/$name.log" 2>&1
}
start() {  # name steps python script args...: the run in the background (attempt), returning once it has
           # logged a step, so that the next run's vLLM starts only when this one's is up: vLLM sizes its KV
           # cache by the memory that goes while it starts, and counts what a neighbour takes meanwhile as its
           # own (engines started 45 s apart on one H100 refused with "No available memory for the cache
           # blocks"). A try that ends before logging a step is made once more, GAP s later. 1 if none runs
  local name=$1 steps=$2 before pid try; shift 2
  done_run "$name" "$steps" && return 1
  if [ -f "$OUT/runs/$name/trainer_state.pt" ]; then :  # attempt continues it, its log appended
  elif [ -e "$OUT/runs/$name" ]; then
    echo "rest.sh: $OUT/runs/$name holds an unfinished run (its metrics do not reach step $steps); move it away" >&2
    FAILED=1; return 1
  else : > "$OUT/runs/$name.log"
  fi
  before=$(logged "$name")
  for try in 1 2; do
    attempt "$name" "$steps" "$@" & pid=$!
    while kill -0 "$pid" 2> /dev/null && [ "$(logged "$name")" -le "$before" ]; do sleep 1; done
    if [ "$(logged "$name")" -gt "$before" ]; then PIDS+=("$pid"); RUNS+=("$name"); return 0; fi
    wait "$pid" && return 0  # ended well without a new step: nothing was left to run
    [ $try = 2 ] && break
    echo "rest.sh: $name ended before its first step; once more in $GAP s (its log: $OUT/runs/$name.log)" >&2
    sleep "$GAP"
  done
  echo "rest.sh: $name failed (its log: $OUT/runs/$name.log)" >&2; FAILED=1; return 1
}
finish() {  # wait for the runs started; one that fails is one line
  local i
  for i in "${!PIDS[@]}"; do
    wait "${PIDS[$i]}" || { echo "rest.sh: ${RUNS[$i]} failed (its log: $OUT/runs/${RUNS[$i]}.log)" >&2; FAILED=1; }
  done
  PIDS=(); RUNS=()
}
sft() {  # name budget lr seed
  start "$1" "$STEPS" python "$ROOT/train_sft.py" --model "$MODEL" --data "$D/fit.jsonl" --batch 64 \
    --micro-tokens 8192 --grad-ckpt always --save-every 0 ${BUDGET[$2]} --lr "$3" --seed "$4" --steps "$STEPS" \
    $SFT_EXTRA --run-dir "$OUT/runs/$1"
}
grpo() {  # name budget lr seed steps [data epochs]: `steps` of an `epochs`-epoch schedule (default: one
          # epoch of fit.jsonl; grpo-more: OUT/train.jsonl and the default 3, the committed runs' recipe)
  start "$1" "$5" python "$ROOT/train_grpo.py" --model "$MODEL" --data "${6:-$D/fit.jsonl}" --eval-every 0 \
    --epochs "${7:-1}" --steps "$5" ${BUDGET[$2]} --lr "$3" --seed "$4" --max-new-tokens 1024 --max-model-len 2048 \
    --gpu-memory-utilization "$GPU" --micro-tokens 4096 --grad-ckpt always --save-every 2 $GRPO_EXTRA \
    --run-dir "$OUT/runs/$1"
}
scored() {  # set name: in that set's summary, or a committed completions file
  grep -q "\"name\": \"$2\"" "$OUT/$1/summary.jsonl" 2>/dev/null || [ -f "$OUT/$1/$2.jsonl.gz" ]
}
evaluate() {  # select|test steps names...: the adapters of those runs finished and not yet scored, on one engine
  local set=$1 steps=$2 tokens=512 todo=() n; shift 2; [ "$set" = test ] && tokens=1024
  for n in "$@"; do done_run "$n" "$steps" && ! scored "$set" "$n" && todo+=("$OUT/runs/$n/adapter.safetensors"); done
  [ ${#todo[@]} = 0 ] && return 0
  python "$ROOT/tools/eval_many.py" --model "$MODEL" --data "$D/$set.jsonl" --out-dir "$OUT/$set" \
    --max-new-tokens $tokens --gpu-memory-utilization "$EVAL_GPU" $EVAL_EXTRA "${todo[@]}" >> "$OUT/$set.log" 2>&1 \
    || { echo "rest.sh: the evaluation on $set failed (its log: $OUT/$set.log)" >&2; FAILED=1; }
}
chosen() {  # prefix (sel- or grpo-sel-): "budget lr" per budget, by the protocol's rule (analyze.chosen); else
            # one line and status 1
  [ -f "$OUT/select/summary.jsonl" ] || {
    echo "rest.sh: no $OUT/select/summary.jsonl: nothing is chosen before the selection set has scored the $1 runs" >&2
    return 1; }
  PYTHONPATH=$HERE python -c "import sys, analyze
try:
    got = analyze.chosen(sys.argv[1], sys.argv[2])
except ValueError as e:  # analyze.Bad: a damaged summary, rows scored on two data files
    sys.exit(f'rest.sh: {e}')
if not got:
    sys.exit(f'rest.sh: {sys.argv[1]} holds no {sys.argv[2]}<budget>-lr<lr> row: nothing is chosen yet')
for b, lr in sorted(got.items()): print(b, lr)" "$OUT/select/summary.jsonl" "$1"
}
choose_grpo() {  # names...: once the runs started end, the selection set scores those finished, and
                 # OUT/chosen-grpo.txt is the choice among every grpo-sel- row; exits 1 if none can be made
  finish
  evaluate select "$GSTEPS" "$@"
  pick=$(chosen grpo-sel-) || exit 1
  echo "$pick" | tee "$OUT/chosen-grpo.txt"
}
at_most() { while [ $(jobs -rp | wc -l) -ge $1 ]; do sleep 2; done; }  # -p: a job a line (a job's text spans lines)

case $STAGE in
sft-edge)
  names=(); for b in p1 p13 p196 p2548 p12544; do names+=(sel-$b-lr1e-2); sft sel-$b-lr1e-2 $b 1e-2 0; done
  finish
  evaluate select "$STEPS" "${names[@]}" ;;
sft-finals)
  pick=$(chosen sel-) || exit 1
  echo "$pick" | tee "$OUT/chosen-sft.txt"
  names=()
  while read b lr; do
    seeds=1; [ $b = p13 ] && seeds="1 2"
    for s in $seeds; do names+=($b-lr$lr-seed$s); sft $b-lr$lr-seed$s $b $lr $s; done
    done_run sel-$b-lr$lr "$STEPS" && names+=(sel-$b-lr$lr) \
      || echo "(no finished selection run $OUT/runs/sel-$b-lr$lr: its test is not run)"
  done <<< "$pick"
  finish
  evaluate test "$STEPS" "${names[@]}" ;;
grpo-select)
  names=()
  for b in p13 p196; do for lr in $LRS; do
    names+=(grpo-sel-$b-lr$lr); grpo grpo-sel-$b-lr$lr $b $lr 0 "$GSTEPS" && at_most "$AT_MOST"
  done; done
  choose_grpo "${names[@]}" ;;
grpo-edge)
  [ -f "$OUT/chosen-grpo.txt" ] || { echo "rest.sh: no $OUT/chosen-grpo.txt: run grpo-select first" >&2; exit 1; }
  lrs=($LRS); edges=($EDGES); names=()
  while read b lr; do  # the lowest lr tried gets the one below it, the highest the one above
    case $lr in "${lrs[0]}") next=${edges[0]} ;; "${lrs[-1]}") next=${edges[1]} ;; *) continue ;; esac
    names+=(grpo-sel-$b-lr$next); grpo grpo-sel-$b-lr$next $b $next 0 "$GSTEPS" && at_most "$AT_MOST"
  done < "$OUT/chosen-grpo.txt"
  choose_grpo "${names[@]}" ;;
grpo-seeds)
  lr=$(awk '$1 == "p13" {print $2}' "$OUT/chosen-grpo.txt" 2>/dev/null)
  [ -n "$lr" ] || { echo "rest.sh: no lr chosen at p13 in $OUT/chosen-grpo.txt: run grpo-select first" >&2; exit 1; }
  names=()
  for s in 0 1 2; do names+=(grpo-ep1-p13-lr$lr-seed$s); grpo grpo-ep1-p13-lr$lr-seed$s p13 $lr $s "$EPOCH"; done
  finish
  evaluate test "$EPOCH" "${names[@]}" ;;
grpo-more)
  [ -f "$OUT/train.jsonl" ] || cat "$D/fit.jsonl" "$D/select.jsonl" > "$OUT/train.jsonl" || exit 2
  names=()
  for x in $MORE; do
    n=grpo-${x%:*}-lr1e-4-seed${x#*:}; names+=($n)
    grpo $n ${x%:*} 1e-4 ${x#*:} "$RSTEPS" "$OUT/train.jsonl" 3
  done
  finish
  evaluate test "$RSTEPS" "${names[@]}" ;;
esac
exit $FAILED
