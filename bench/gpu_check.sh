#!/usr/bin/env bash
# The GPU check on a bare GPU node with no internet (issue 27): install the carried wheels, then run the parts asked
# for (default: tests gpt2 llama lora) and print one table.
#
#   here:      python bench/offline_wheels.py --have bench/gpu-node-packages.txt --python 3.12 --extras gpu \
#                --add trl --out .whl      (the lent machines' packages; 22 wheels, 52 MiB on 2026-12-07, which with
#                                           the 2 MiB working tree fits a device call's 64 MiB: carry .whl)
#   the node:  bash bench/gpu_check.sh [tests] [gpt2] [llama] [lora] [grpo] [grpo-vllm]   (logs in $OUT, or ./gpu-check)
# QLoRA's GPU tests run only where bitsandbytes imports: `--extras qlora` adds its 41 MiB wheel, more than fits beside
# the others in one device call's 64 MiB; carry it in a call of its own.
#
# The first compilation of a 124M or 1B model takes one to two minutes per process (one H200, 2026-12-04): longer
# than the steps a bench times. So the check runs in two phases:
#   1. untimed, side by side: pytest -m gpu (four tests at a time), and each bench's compiled contenders for 20 steps
#      with their figures dropped (`--warm-only`), which leave torch.compile's cache on disk. On a GPU of 120 GiB or
#      more (an H200: the device to run the check on) the Llama-1B contenders compile all at once, elsewhere one at
#      a time.                                                                                            at most 300 s
#   2. timed, one part at a time, each compiling from that cache in seconds:
#   gpt2   bench/mfu.py GPT-2 124M compiled: llmkit and the hand-written loop                                      180 s
#   llama  bench/mfu.py Llama-1B compiled: llmkit, Trainer, llmkit fp8                                             300 s
#   lora   bench/lora_vs_trl.py, 1B base, 400 rows of up to 1024 tokens, steady state and in all                  180 s
#   grpo   bench/grpo_vs_trl.py, 1B base, compiled sampling (only when named; not warmed, since its time in all
#          counts llmkit's compilation)                                                                            240 s
#   grpo-vllm  the same, both sampling with a colocated vLLM (only when named, where vLLM is installed)           240 s
# Timed figures are steady state, so the warm cache changes none of them but the LoRA bench's "in all" (its compile
# then takes seconds). These limits are sized from CPU runs; none was measured on a GPU yet. Each part has its own
# limit, past which its processes are killed, all of them (a bench's contender too, which would otherwise finish its
# step on the GPU beside the next part); the script goes on when one fails. BUDGET (seconds, default 570) bounds the
# run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
WORK=$(mktemp -d)
BUDGET=${BUDGET:-570}
START=$(date +%s)
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python3}
PARTS=${*:-tests gpt2 llama lora}

left() { echo $((BUDGET - ($(date +%s) - START))); }
named() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# part NAME CAP COMMAND...: run with at most CAP seconds (less when the budget is nearly spent); log to $OUT/NAME.log
part() {
  local name=$1 cap=$2
  shift 2
  named "$name" || return
  local limit=$(($(left) < cap ? $(left) : cap))
  if [ "$limit" -lt 30 ]; then
    echo "| $name | skipped: budget spent | |" >>"$OUT/table.md"
    return
  fi
  echo "== $name (at most ${limit}s)"
  local t0=$(date +%s)
  timeout --signal=KILL "$limit" "$@" >"$OUT/$name.log" 2>&1
  local status=$(outcome $?) took=$(($(date +%s) - t0))
  echo "   $status in ${took}s"
  echo "| $name | $status, ${took}s | $(summary "$name") |" >>"$OUT/table.md"
}
summary() {
  case $1 in
    tests) { grep -E "passed|failed|skipped|error" "$OUT/$1.log" | tail -n 1; grep -E "^FAILED" "$OUT/$1.log" |
      cut -c1-150; } | tr '\n' ';' ;;
    *) grep -E "tokens/s|^ratio|^plan|loss curve|no result|failed" "$OUT/$1.log" | sed 's/  */ /g' | tr '\n' ';' ;;
  esac
}
# warm NAME COMMAND...: phase 1's untimed run for the bench part NAME, when named; its log joins $OUT/warm.log
warm() {
  local name=$1
  shift
  named "$name" || return 0
  local t0=$(date +%s)
  if [ $((PHASE1_END - t0)) -lt 30 ]; then
    echo "| warm $name | skipped: phase 1 spent | |" >"$WORK/warm-$name.row"
    return 0
  fi
  # expandable segments: side by side, each process holds only what it uses (the timed runs keep the default)
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout --signal=KILL $((PHASE1_END - t0)) "$@" \
    >"$WORK/warm-$name.log" 2>&1
  local status=$(outcome $?) took=$(($(date +%s) - t0))
  local figures=$(grep -E "^warmed|^llmkit finetune" "$WORK/warm-$name.log" | sed 's/  */ /g' | tr '\n' ';')
  echo "| warm $name | $status, ${took}s | $figures |" >"$WORK/warm-$name.row"
}
outcome() { case $1 in 0) echo ok ;; 137) echo "timed out" ;; *) echo "exit $1" ;; esac; }

if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$WORK/install.log" 2>&1 || { echo "wheel install failed:"; tail -n 20 "$WORK/install.log"; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)"
  $PY -c "
import importlib.metadata as m
def version(p):
    try:
        return m.version(p)
    except m.PackageNotFoundError:
        return 'missing'
print(*(f'{p} {version(p)}' for p in ('liger-kernel', 'torchao', 'trl', 'deepspeed')))"
} 2>&1 | grep -v Warning | tee "$OUT/env.txt"
echo "| part | outcome | figures |" >"$OUT/table.md"
echo "| --- | --- | --- |" >>"$OUT/table.md"

# Phase 1: the GPU tests, and beside them the benches' first compilations.
memory=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1)
llama_at_once=1
# MiB: an H200's 140 GiB hold three 1B runs (28 GiB each by `llmkit plan`) beside the rest (about 25 GiB)
[ "${memory:-0}" -ge 122000 ] && llama_at_once=3
PHASE1=$(($(left) < 300 ? $(left) : 300))
PHASE1_END=$(($(date +%s) + PHASE1))
select=()
$PY -c "import deepspeed" >/dev/null 2>&1 || select=(-k "not zero3")
echo "== phase 1 (untimed, at most ${PHASE1}s): tests beside the benches' first compilations"
part tests "$PHASE1" $PY -m pytest -m gpu -q -n 4 --tb=short -p no:cacheprovider "${select[@]}" tests/test_gpu.py &
{
  warm gpt2 $PY bench/mfu.py --arch gpt2 --compile --contenders llmkit,loop --warm-only 2 --timeout "$PHASE1"
  warm lora $PY bench/lora_vs_trl.py --size 1b --rows 400 --max-length 1024 --contenders llmkit --timeout "$PHASE1"
} &
warm llama $PY bench/mfu.py --arch llama --compile --contenders llmkit,trainer,llmkit-fp8 \
  --warm-only "$llama_at_once" --timeout "$PHASE1" &
wait
cat "$WORK"/warm-*.row >>"$OUT/table.md" 2>/dev/null
for log in "$WORK"/warm-*.log; do
  [ -e "$log" ] && { echo "==> $(basename "$log")"; cat "$log"; } >>"$OUT/warm.log"
done

# Phase 2: timed, one part at a time.
part gpt2 180 $PY bench/mfu.py --arch gpt2 --compile --steps 60 --contenders llmkit,loop --timeout 160
part llama 300 $PY bench/mfu.py --arch llama --compile --fp8 --steps 40 --contenders llmkit,trainer,llmkit-fp8 \
  --timeout 90
part lora 180 $PY bench/lora_vs_trl.py --size 1b --rows 400 --max-length 1024 --timeout 160
part grpo 240 $PY bench/grpo_vs_trl.py --size 1b --steps 10 --max-new-tokens 128 --compile-sampling
# (vLLM, where the node has it: its wheel is larger than what can be carried to a node without internet)
$PY -c "import vllm" >/dev/null 2>&1 &&
  part grpo-vllm 240 $PY bench/grpo_vs_trl.py --size 1b --steps 10 --max-new-tokens 128 --vllm

echo
echo "GPU check on $(head -n 1 "$OUT/env.txt"), $(($(date +%s) - START))s:"
cat "$OUT/table.md"
rm -rf "$WORK"
