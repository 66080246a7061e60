#!/usr/bin/env bash
# The GPU check on a bare GPU node with no internet (issue 27): install the carried wheels, then run the parts asked
# for (default: all) and print one table.
#
#   here:      python bench/offline_wheels.py --have NODE-FREEZE --python 3.12 --extras gpu --add trl --out .whl
#   the node:  bash bench/gpu_check.sh [tests] [gpt2] [llama] [lora] [grpo] [grpo-vllm]   (logs in $OUT, or ./gpu-check)
# QLoRA's GPU tests run only where bitsandbytes imports: `--extras qlora` adds its 41 MiB wheel, more than fits beside
# the others in one device call's 64 MiB; carry it in a call of its own.
#
# Parts, with their time limits (the first compilation of a 124M or 1B model takes one to two minutes per process,
# which sets most of them; measured on one H200 on 2026-12-04, where limits a third of these cut every part off):
#   tests  pytest -m gpu, four tests at a time (zero3 only where DeepSpeed imports)     300 s
#   gpt2   bench/mfu.py GPT-2 124M compiled: llmkit and the hand-written loop          300 s
#   llama  bench/mfu.py Llama-1B compiled: llmkit, Trainer, llmkit fp8                 540 s
#   lora   bench/lora_vs_trl.py, 1B base, 200 rows of up to 1024 tokens                240 s
#   grpo   bench/grpo_vs_trl.py, 1B base, llmkit with compiled sampling and TRL        240 s (not yet run on a GPU)
#   grpo-vllm  the same, both sampling with a colocated vLLM (only where vLLM is installed)   240 s
# All five take longer than one device call may (10 minutes): run `tests gpt2`, `llama` and `lora grpo` in three calls.
# Each part has its own limit and the script goes on when one fails; BUDGET (seconds, default 570) bounds the run.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check}
mkdir -p "$OUT"
BUDGET=${BUDGET:-570}
START=$(date +%s)
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python3}
PARTS=${*:-tests gpt2 llama lora grpo grpo-vllm}

left() { echo $((BUDGET - ($(date +%s) - START))); }
# part NAME CAP COMMAND...: run with at most CAP seconds (less when the budget is nearly spent); log to $OUT/NAME.log
part() {
  local name=$1 cap=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return ;; esac
  local limit=$(($(left) < cap ? $(left) : cap))
  if [ "$limit" -lt 30 ]; then
    echo "| $name | skipped: budget spent | |" >>"$OUT/table.md"
    return
  fi
  echo "== $name (at most ${limit}s)"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? took=$(($(date +%s) - t0)) status=ok
  [ $rc -eq 0 ] || status="exit $rc"
  [ $rc -eq 124 ] && status="timed out"
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

if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/install.log" 2>&1 || { echo "wheel install failed:"; tail -n 20 "$OUT/install.log"; }
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

select=()
$PY -c "import deepspeed" >/dev/null 2>&1 || select=(-k "not zero3")
part tests 300 $PY -m pytest -m gpu -q -n 4 --tb=short -p no:cacheprovider "${select[@]}" tests/test_gpu.py
part gpt2 300 $PY bench/mfu.py --arch gpt2 --compile --steps 60 --contenders llmkit,loop --timeout 280
part llama 540 $PY bench/mfu.py --arch llama --compile --fp8 --steps 40 --contenders llmkit,trainer,llmkit-fp8 \
  --timeout 240
part lora 240 $PY bench/lora_vs_trl.py --size 1b --rows 200 --max-length 1024
part grpo 240 $PY bench/grpo_vs_trl.py --size 1b --steps 10 --max-new-tokens 128 --compile-sampling
# (vLLM, where the node has it: its wheel is larger than what can be carried to a node without internet)
$PY -c "import vllm" >/dev/null 2>&1 &&
  part grpo-vllm 240 $PY bench/grpo_vs_trl.py --size 1b --steps 10 --max-new-tokens 128 --vllm

echo
echo "GPU check on $(head -n 1 "$OUT/env.txt"), $(($(date +%s) - START))s:"
cat "$OUT/table.md"
