#!/usr/bin/env bash
# What the protocol still lacks, in the order the device time should go. NOT RUN on a GPU (no device
# time was left). Each stage ran end to end on a 2-core CPU with the tiny model (tests/tiny.py, its
# max_position_embeddings raised to 4096; 224 rows to fit, 32 to select), 2026-12-06, in 50 / 47 / 112 /
# 62 s, with STEPS=2 GSTEPS=2 EPOCH=2 GAP=3 GPU=0.05 EVAL_GPU=0.1 SFT_EXTRA="--batch 8"
# GRPO_EXTRA="--prompts-per-step 4 --mini-batch 2 --max-new-tokens 32 --max-model-len 512"
# EVAL_EXTRA="--max-new-tokens 32" VLLM_ENABLE_V1_MULTIPROCESSING=0.
#   sft-edge     SFT at lr 1e-2 (the grid's next step: 3e-3 won at every budget), seed 0, 30 steps, five
#                budgets; the selection set for the five adapters
#   sft-finals   per budget the lr the selection set chooses among all SFT lrs (strict, then math-verify):
#                seeds 1-2 at 13 parameters, seed 1 elsewhere (seed 0 is the selection run), 30 steps;
#                the GSM8K test for every run at the chosen lrs not tested yet
#   grpo-select  GRPO at 13 and 196 parameters, lr 5e-5 / 1e-4 / 2e-4, seed 0, GSTEPS steps of one epoch's
#                schedule; the selection set. Where the best is at an edge, run it again with LRS="2e-5" or
#                LRS="5e-4"
#   grpo-seeds   GRPO at 13 parameters at the chosen lr, one epoch (EPOCH steps), seeds 0-2; the GSM8K test
# Every selection evaluation is greedy, 512 new tokens, on select.jsonl (GSM8K train's last 500 rows, never
# trained on); every test evaluation greedy, 1,024 new tokens, all 1,319 rows.
# usage: rest.sh MODEL DATA_DIR OUT STAGE   (DATA_DIR and OUT as protocol.sh's; OUT holds runs/, select/, test/)
set -uo pipefail
MODEL=$1; D=$2; OUT=$3; STAGE=$4; mkdir -p $OUT/runs $OUT/select $OUT/test
STEPS=${STEPS:-30}; GSTEPS=${GSTEPS:-40}; EPOCH=${EPOCH:-108}; LRS=${LRS:-5e-5 1e-4 2e-4}
GPU=${GPU:-0.12}; EVAL_GPU=${EVAL_GPU:-0.5}; GAP=${GAP:-45}  # seconds between starts of vLLM on one GPU
SFT_EXTRA=${SFT_EXTRA:-}; GRPO_EXTRA=${GRPO_EXTRA:-}; EVAL_EXTRA=${EVAL_EXTRA:-}  # more flags (the CPU check's)
declare -A BUDGET=([p1]="--u 1" [p13]="--u 13" [p196]="--u 1 --n-tie 1" [p2548]="--u 13 --n-tie 1" [p12544]="--u 64 --r 8 --n-tie 1")
sft() {  # name budget lr seed
  python train_sft.py --model $MODEL --data $D/fit.jsonl --batch 64 --micro-tokens 8192 --grad-ckpt always \
    --save-every 0 ${BUDGET[$2]} --lr $3 --seed $4 --steps $STEPS $SFT_EXTRA --run-dir $OUT/runs/$1 > $OUT/runs/$1.log 2>&1
}
grpo() {  # name budget lr seed steps (of a one-epoch schedule)
  python train_grpo.py --model $MODEL --data $D/fit.jsonl --eval-every 0 --epochs 1 --steps $5 ${BUDGET[$2]} \
    --lr $3 --seed $4 --max-new-tokens 1024 --max-model-len 2048 --gpu-memory-utilization $GPU --micro-tokens 4096 \
    --grad-ckpt always --save-every 10 $GRPO_EXTRA --run-dir $OUT/runs/$1 > $OUT/runs/$1.log 2>&1
}
evaluate() {  # select|test adapters...
  local set=$1 tokens=512; shift; [ $set = test ] && tokens=1024
  python tools/eval_many.py --model $MODEL --data $D/$set.jsonl --out-dir $OUT/$set --max-new-tokens $tokens \
    --gpu-memory-utilization $EVAL_GPU $EVAL_EXTRA "$@" >> $OUT/$set.log 2>&1
}
chosen() {  # prefix (sel- or grpo-sel-): "budget lr" per budget, by the protocol's rule (analyze.chosen)
  PYTHONPATH=$(dirname $0) python -c "import analyze, sys
for b, lr in sorted(analyze.chosen(sys.argv[1], sys.argv[2]).items()): print(b, lr)" $OUT/select/summary.jsonl $1
}
at_most() { while [ $(jobs -r | wc -l) -ge $1 ]; do sleep 2; done; }
untested() { for a in "$@"; do n=$(basename $(dirname $a)); ls $OUT/test/$n.jsonl* > /dev/null 2>&1 || echo $a; done; }
case $STAGE in
sft-edge)
  for b in p1 p13 p196 p2548 p12544; do sft sel-$b-lr1e-2 $b 1e-2 0 & sleep 3; done; wait
  evaluate select $OUT/runs/sel-*-lr1e-2/adapter.safetensors ;;
sft-finals)
  chosen sel- | tee $OUT/chosen-sft.txt
  while read b lr; do
    seeds=1; [ $b = p13 ] && seeds="1 2"
    for s in $seeds; do sft $b-lr$lr-seed$s $b $lr $s & sleep 3; done
  done < $OUT/chosen-sft.txt; wait
  evaluate test $(untested $(while read b lr; do ls $OUT/runs/sel-$b-lr$lr/adapter.safetensors \
    $OUT/runs/$b-lr$lr-seed*/adapter.safetensors; done < $OUT/chosen-sft.txt)) ;;
grpo-select)
  for b in p13 p196; do for lr in $LRS; do grpo grpo-sel-$b-lr$lr $b $lr 0 $GSTEPS & sleep $GAP; at_most 4; done; done; wait
  evaluate select $(ls $OUT/runs/grpo-sel-*/adapter.safetensors | grep -E -- "-lr($(echo $LRS | tr ' ' '|'))/")
  chosen grpo-sel- | tee $OUT/chosen-grpo.txt ;;
grpo-seeds)
  lr=$(awk '$1 == "p13" {print $2}' $OUT/chosen-grpo.txt)
  for s in 0 1 2; do grpo grpo-p13-lr$lr-seed$s p13 $lr $s $EPOCH & sleep $GAP; done; wait
  evaluate test $(untested $OUT/runs/grpo-p13-lr$lr-seed*/adapter.safetensors) ;;
*) echo "rest.sh: STAGE is sft-edge, sft-finals, grpo-select or grpo-seeds"; exit 2 ;;
esac
