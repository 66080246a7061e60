"""GRPO: llmkit vs TRL's GRPOTrainer, same base model, prompts, reward, answers per prompt, lengths and steps.

    python bench/grpo_vs_trl.py                                   # a small run on a CPU
    python bench/grpo_vs_trl.py --size 1b --steps 20 --max-new-tokens 256   # one GPU, bf16

Each contender runs in its own process (so peak memory is its own): llmkit `finetune --task grpo` and TRL's
GRPOTrainer, both sampling with transformers' `generate` (or, with `--vllm`, each with a vLLM engine in its process,
0.3 of a GPU's memory), full fine-tuning, the same loss (`--loss`, default dapo, TRL's default), beta 0 (TRL's
default: no reference model), `--num-iterations` updates per sampled batch (default 1; with more, both keep the
sampling log-probs and learn from each batch again). Each step takes `--prompts` prompts with `--generations`
answers each (TRL: per_device_train_batch_size = prompts x generations). The base model is initialized from a
config, so answers seldom end before `--max-new-tokens` and both sample about the same number of tokens. The prompts
are the first sentences of built-in stories; the reward (a function both call) is the share of an answer's words
that appear in the prompt, a checkable quantity that a model can raise. Time is the wall time from the trainer's
set-up (libraries imported) to the end of training, sampling included; "s/step" is the median step time after the
first round (steady state: sampling and update, no set-up; a round's steps averaged, with --num-iterations above 1);
"reward" is the mean reward over the last quarter of the steps. Needs `pip install trl` (a dev dependency).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from _cli import report, run_apart, scratch  # noqa: E402  (bench/_cli.py)

SIZES = {"small": ["model.n_layers=4", "model.hidden_size=128", "model.n_heads=4", "model.n_kv_heads=2"],
         "1b": ["model.n_layers=22", "model.hidden_size=2048", "model.n_heads=32", "model.n_kv_heads=4",
                "model.intermediate_size=5632"]}  # fmt: skip
CONTENDERS = ("llmkit", "trl")
REWARD = '''
def overlap(prompt, answer, row=None):
    """The share of the answer's words that appear in the prompt (0 for an empty answer)."""
    words = answer.lower().split()
    seen = set(prompt.lower().split())
    return sum(word in seen for word in words) / len(words) if words else 0.0


def trl_overlap(prompts, completions, **_):
    return [overlap(prompt, completion) for prompt, completion in zip(prompts, completions)]
'''


def write_prompts(path: Path, n: int) -> list[dict[str, str]]:
    from llmkit.data.corpus import STORIES, generate

    rows = []
    for doc in generate(STORIES, n, seed=0):
        sentences = [s.strip() + "." for s in doc.text.replace("\n", " ").split(".") if s.strip()]
        rows.append({"prompt": " ".join(sentences[:2])})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--generations", type=int, default=8, help="answers per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--loss", choices=["grpo", "dr_grpo", "dapo"], default="dapo")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--num-iterations", type=int, default=1, help="optimizer steps per sampled batch")
    parser.add_argument("--compile-sampling", action="store_true", help="llmkit: finetune.grpo.compile_sampling")
    parser.add_argument("--vllm", action="store_true",
                        help="both sample with a colocated vLLM (llmkit: finetune.grpo.engine=vllm; TRL: use_vllm, "
                        "vllm_mode colocate), installed apart")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800, help="seconds each contender may take")
    parser.add_argument("--run", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        report(run_one(args), args.result)
        return

    from llmkit.config import load_config
    from llmkit.data.tokenizer import train_bpe
    from llmkit.models import build_model

    cuda = torch.cuda.is_available()
    work = scratch("llmkit-grpo-")
    rows = write_prompts(work / "prompts.jsonl", args.steps * args.prompts)
    (work / "bench_reward.py").write_text(REWARD)
    tokenizer = train_bpe([r["prompt"] for r in write_prompts(work / "corpus.jsonl", 2000)], vocab_size=args.vocab)
    prompt_tokens = max(len(tokenizer(r["prompt"])["input_ids"]) for r in rows)
    context = prompt_tokens + args.max_new_tokens
    base_cfg = load_config(None, [*SIZES[args.size], f"model.context_length={context}"])
    torch.manual_seed(0)
    build_model(base_cfg.model, tokenizer).save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")
    answers = args.steps * args.prompts * args.generations
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'}; base {args.size}; {args.steps} steps x "
          f"{args.prompts} prompts x {args.generations} answers of up to {args.max_new_tokens} tokens "
          f"({answers:,} answers); loss {args.loss}; num_iterations {args.num_iterations}; "
          f"{'bf16' if cuda else 'fp32'}; sampled by {'vLLM' if args.vllm else 'generate'}")  # fmt: skip
    results = {}
    for name in CONTENDERS:
        same = ["--work", str(work), "--size", args.size, "--steps", str(args.steps), "--prompts", str(args.prompts),
                "--generations", str(args.generations), "--max-new-tokens", str(args.max_new_tokens),
                "--loss", args.loss, "--context", str(context), "--num-iterations", str(args.num_iterations),
                *(["--compile-sampling"] if args.compile_sampling else []),
                *(["--vllm"] if args.vllm else [])]  # fmt: skip
        result = run_apart(str(Path(__file__).resolve()), name, same, timeout=args.timeout)
        if result is None:
            raise SystemExit(f"{name}: no result (its output is above)")
        results[name] = r = result
        print(f"{name:<8}{r['seconds']:8.1f} s in all  {r['step_seconds']:6.3f} s/step (steady)  "
              f"{r['sampled_tokens'] / r['seconds']:>9,.0f} answer tokens/s  peak {r['peak_gib']:6.2f} GiB  "
              f"reward {r['reward']:.3f}")  # fmt: skip
    ours, theirs = results["llmkit"], results["trl"]
    print(f"ratio llmkit / trl: {theirs['seconds'] / ours['seconds']:.2f}x speed in all, "
          f"{theirs['step_seconds'] / ours['step_seconds']:.2f}x steady-state speed, "
          f"{ours['peak_gib'] / theirs['peak_gib']:.2f}x peak memory")  # fmt: skip


def run_one(args: argparse.Namespace) -> dict[str, float]:
    cuda = torch.cuda.is_available()
    sys.path.insert(0, str(args.work))  # the reward module, for both
    run = run_llmkit if args.run == "llmkit" else run_trl
    seconds, rewards, sampled, steps = run(args.work, args, cuda)
    if cuda:
        peak = torch.cuda.max_memory_reserved() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tail = rewards[-max(1, len(rewards) // 4) :]
    rounds = args.num_iterations  # a round: the step that samples and the steps that learn from its answers again
    per_round = [sum(steps[i : i + rounds]) / rounds for i in range(rounds, len(steps) - rounds + 1, rounds)]
    steady = sorted(per_round or steps)
    return {"seconds": seconds, "peak_gib": peak, "reward": sum(tail) / len(tail), "sampled_tokens": sampled,
            "step_seconds": steady[len(steady) // 2]}  # fmt: skip


Outcome = tuple[float, list[float], float, list[float]]  # seconds, rewards, sampled tokens, each step's seconds


def run_llmkit(work: Path, args: argparse.Namespace, cuda: bool) -> Outcome:
    import accelerate  # noqa: F401  (imported before the clock starts, as TRL's side imports them with trl)
    import transformers  # noqa: F401

    from llmkit.config import load_config
    from llmkit.train.finetune import finetune

    cfg = load_config(None, [
        f"model.init_from={work / 'base'}", f"data.sources=[{work / 'prompts.jsonl'}]", "data.val_fraction=0",
        f"out_dir={work / 'llmkit'}", "finetune.task=grpo", "finetune.method=full",
        "finetune.grpo.rewards=[bench_reward:overlap]", f"finetune.grpo.loss={args.loss}",
        f"finetune.grpo.generations={args.generations}", f"finetune.grpo.max_new_tokens={args.max_new_tokens}",
        "finetune.grpo.beta=0", f"finetune.max_length={args.context}",
        f"finetune.grpo.num_iterations={args.num_iterations}",
        f"train.max_steps={args.steps}", f"train.micro_batch_size={args.prompts}", "train.eval_every=1000000",
        "optimizer.lr=1e-5", "schedule.warmup_steps=0", "logging.report_to=[]", "logging.plot=false",
        "logging.every_steps=1", f"finetune.grpo.compile_sampling={args.compile_sampling}", "train.compile=false",
        f"precision.dtype={'bf16' if cuda else 'fp32'}", f"finetune.grpo.engine={'vllm' if args.vllm else 'generate'}",
    ])  # fmt: skip
    start = time.perf_counter()
    finetune(cfg)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (work / "llmkit" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "reward" in r]  # the steps that sampled
    sampled = sum(r["answer_tokens_mean"] for r in logged) * args.prompts * args.generations
    elapsed = [0.0, *(r["elapsed_s"] for r in records if "train_tokens_per_s" in r)]  # every step
    return seconds, [r["reward"] for r in logged], sampled, [b - a for a, b in itertools.pairwise(elapsed)]


def run_trl(work: Path, args: argparse.Namespace, cuda: bool) -> Outcome:
    from bench_reward import trl_overlap
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    start = time.perf_counter()  # llmkit's time counts its loading the model and prompts too
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.bfloat16 if cuda else torch.float32)
    config = GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=args.prompts * args.generations,
        num_generations=args.generations, max_completion_length=args.max_new_tokens, loss_type=args.loss,
        beta=0.0, max_steps=args.steps, learning_rate=1e-5, bf16=cuda, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=not cuda, lr_scheduler_type="cosine", warmup_steps=0, seed=0,
        num_iterations=args.num_iterations, use_vllm=args.vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=0.3,
    )  # fmt: skip
    trainer = GRPOTrainer(model=model, reward_funcs=trl_overlap, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)  # fmt: skip
    trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    logged = [entry for entry in history if "reward" in entry]
    sampled = sum(entry["completions/mean_length"] for entry in logged) * args.prompts * args.generations
    return (
        seconds,
        [entry["reward"] for entry in logged],
        sampled,
        [e["step_time"] for e in history if "step_time" in e],
    )


if __name__ == "__main__":
    main()
