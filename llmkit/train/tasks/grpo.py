"""`--task grpo`: online RL with verifiable rewards (GRPO and its close variants), one more task on the seam.

Rows are prompts: `prompt` (plain text), `messages` (a chat ending in a user turn), or any fields a task-file reward
renders with its prompt template; every other field stays with the row for the rewards (llmkit.train.rewards).

At the start of each optimizer step every prompt of the step gets `grpo.generations` answers sampled by the model
being trained (transformers' `generate` with its KV cache, prompts left-padded, or vLLM with `engine: vllm`,
llmkit.train.tasks.vllm_sampling; `temperature`/`top_p`/`top_k`, up to `max_new_tokens`, ending at the end-of-turn
token or a stop string). Samples are drawn from seeds tied to the step, the micro-batch and the process, so a run
resumed after a kill draws the same answers. The rewards score each answer; its advantage compares it with the other
answers to the same prompt. The loss is PPO's clipped surrogate on the answer tokens, plus `beta` times the k3
estimate of the KL to the starting model (with LoRA: the base, adapters off; otherwise a frozen copy of the start),
normalized as the variant says:

| loss | advantage | normalized by |
| --- | --- | --- |
| grpo | (r - mean) / (std + 1e-4) | each answer's tokens averaged, then the answers |
| dr_grpo | r - mean | every answer token summed, / (answers x max_new_tokens) |
| dapo | (r - mean) / (std + 1e-4); clip above at epsilon_high (0.28) | every answer token of the step averaged |
| rloo | r - the mean of the group's other answers | every answer token of the step averaged |

By default each sampled batch is learned from once (TRL's default, num_iterations=1): the ratio to the sampling
policy is 1 in value and its gradient is the policy gradient, so the clip does not bind. With `num_iterations` > 1
the step that samples also keeps the sampling policy's log-probs, and the next num_iterations - 1 steps learn from
the same answers again (no new prompts are read) through the clipped ratio; a checkpoint inside such a round keeps
the round's answers, so a resumed run replays them. The loss and its gradient equal TRL's GRPOTrainer's on the same
answers, rewards and sampling log-probs (tests/test_grpo.py).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.config import RunConfig
from llmkit.data.formats import Example, RowFormats, read_text, read_turns
from llmkit.data.task_files import render_prompt
from llmkit.errors import UserError
from llmkit.losses import IGNORE
from llmkit.train.job import Objective
from llmkit.train.rewards import Scorer, load_rewards
from llmkit.train.setup import compute_dtype
from llmkit.train.step import autocast_context
from llmkit.train.tasks.base import Collate, LmLoss, Task, TaskData, data_fingerprint, split_examples
from llmkit.train.tasks.vllm_sampling import VllmSampler

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Prompt:
    """One prompt row: its token ids, the text the model sees, and the row as read (for the rewards)."""

    key: int  # unique across the training and validation prompts
    ids: np.ndarray
    text: str
    row: dict[str, Any]
    where: str

    def __len__(self) -> int:
        return len(self.ids)


def _prompt_example(record: dict[str, Any], fmt: str, where: str) -> Example:
    if fmt == "messages":
        turns = read_turns(record["messages"], "role", "content", where)
        if turns[-1]["role"] != "user":
            raise UserError(f"{where}: a prompt's messages end with a user turn (the model answers it)")
        return Example(where, messages=turns, extra=record)
    if fmt == "prompt":
        return Example(where, prompt=read_text(record, "prompt", where), extra=record)
    return Example(where, extra=record)  # rendered by a task file's prompt template


PROMPT_FORMATS = RowFormats({"prompt": ("prompt",), "messages": ("messages",), "fields": ()}, _prompt_example)


class GRPO(Task):
    name = "grpo"
    packs = False  # one answer per row; the rows are built each step from the samples
    logits = "whole"  # per-token log-probs of the answers

    def load_data(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        settings = cfg.finetune.grpo
        scorers = load_rewards(settings.rewards)
        template = next((scorer.task for scorer in scorers if scorer.task is not None), None)
        train_rows, val_rows, fmt = split_examples(cfg, PROMPT_FORMATS)
        if fmt == "fields" and template is None:
            raise UserError(
                f"{cfg.data.sources[0]}: rows need a 'prompt' or 'messages' field, or a task-file reward whose "
                "prompt template renders them"
            )
        limit = cfg.finetune.max_length - settings.max_new_tokens
        if limit < 1:
            raise UserError(
                f"finetune.max_length {cfg.finetune.max_length} leaves no room for a prompt before "
                f"finetune.grpo.max_new_tokens {settings.max_new_tokens}; raise max_length"
            )
        train = [_encode(e, i, tokenizer, template, limit) for i, e in enumerate(train_rows)]
        val = [_encode(e, len(train) + i, tokenizer, template, limit) for i, e in enumerate(val_rows)]
        truncated = sum(len(p.ids) == limit for p in train)  # (a prompt of exactly the limit counts too)
        for scorer in scorers if train else []:  # a reward that cannot score an empty answer fails here, first
            scorer.score([train[0].text], [""], [train[0].row], [train[0].where])
        fingerprint = data_fingerprint(cfg, settings.model_dump(mode="json"))
        return TaskData(train, val, fmt, fingerprint, truncated, {"scorers": scorers, "tokenizer": tokenizer})

    def collate(self, pad_id: int, attn_implementation: str) -> Collate:
        return collate_prompts

    def keeps_base(self, cfg: RunConfig) -> bool:
        """With a KL and every weight training, the reference is a frozen copy of the start (LoRA's is the base
        with its adapters off)."""
        return cfg.finetune.grpo.beta > 0 and cfg.finetune.method not in ("lora", "qlora")

    def objective(
        self, model: Any, accelerator: Accelerator, data: TaskData, cfg: RunConfig, lm_loss: LmLoss
    ) -> Objective:
        stops = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        stops = stops if stops is not None else data.details["tokenizer"].eos_token_id
        rollout = Rollout(cfg, data, accelerator, stops if isinstance(stops, list) else [stops])
        replay = rollout if cfg.finetune.grpo.num_iterations > 1 else None
        return Objective(rollout.loss, rollout.count_targets, rollout.evaluate, rollout, rollout.take_metrics, replay,
                         reports_spikes=False)  # fmt: skip

    def steps_per_read(self, cfg: RunConfig) -> int:
        return cfg.finetune.grpo.num_iterations

    def plan_notes(self, cfg: RunConfig) -> list[str]:
        settings = cfg.finetune.grpo
        per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * settings.generations
        notes = [
            f"grpo: each step samples {settings.generations} answers to each of its prompts ({per_step} answers of "
            f"up to {settings.max_new_tokens} tokens per process) with the model being trained; a micro-batch holds "
            f"{settings.generations}x train.micro_batch_size rows, counted above, every row at finetune.max_length",
            "grpo: sampling is counted as one forward pass per token (2N FLOPs) at the MFU given, but it runs one "
            "token at a time and is memory-bound on GPUs: its real time is longer (measure with bench/grpo_vs_trl.py)",
        ]
        if settings.beta > 0 and self.keeps_base(cfg):
            notes.append(
                "grpo: the KL's reference is a frozen copy of the start: one more forward, and its weights "
                "in the compute dtype on every GPU (counted above)"
            )
        elif settings.beta > 0:
            notes.append("grpo: the KL's reference is the base with adapters off: one more forward, no second model")
        if settings.engine == "vllm":
            notes.append(
                f"grpo: engine vllm samples with a second copy of the weights and its own KV cache, "
                f"{settings.vllm_memory:.0%} of the GPU's memory (finetune.grpo.vllm_memory; not counted above), and "
                "is handed the weights before every step that samples"
            )
        if settings.num_iterations > 1:
            notes.append(
                f"grpo: num_iterations {settings.num_iterations}: only the first step of each round samples (and "
                "takes one more forward for the sampling log-probs); the others learn from its answers again, so "
                "these forwards count once per round above"
            )
        return notes

    def plan_shape(self, cfg: RunConfig) -> tuple[int, float]:
        """Each prompt row becomes `generations` answer rows; sampling, the reference with a KL, and the sampling
        policy's log-probs with num_iterations > 1 are forwards, once per num_iterations steps."""
        settings = cfg.finetune.grpo
        forwards = 1 + (settings.beta > 0) + (settings.num_iterations > 1)
        return settings.generations, forwards / settings.num_iterations

    def describe(self, data: TaskData, chat: Any) -> str:
        names = ", ".join(f"{s.name}@{s.weight:g}" for s in data.details["scorers"])
        return f"template {chat.name if chat else '-'}, prompts scored by {names}"

    def stats(self, data: TaskData, chat: Any) -> dict[str, Any]:
        return {"template": chat.name if chat else None, "rewards": [s.name for s in data.details["scorers"]]}


def _encode(example: Example, key: int, tokenizer: Any, template: Any, limit: int) -> Prompt:
    if example.messages:
        text = str(tokenizer.apply_chat_template(list(example.messages), tokenize=False, add_generation_prompt=True))
    elif example.prompt:
        text = example.prompt
    else:
        text = render_prompt(template, example.extra, example.where, tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][-limit:]  # keep the end: the question is read last
    if not ids:
        raise UserError(f"{example.where}: an empty prompt")
    return Prompt(key, np.asarray(ids, dtype=np.int64), text, dict(example.extra), example.where)


def collate_prompts(rows: list[list[Prompt]], indices: list[int] | None = None) -> Batch:
    """Prompts left-padded for sampling (their keys say which rows they are)."""
    prompts = [row[0] for row in rows]
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.from_numpy(prompt.ids)
        mask[i, width - len(prompt) :] = 1
    batch = {"prompt_ids": ids, "prompt_mask": mask, "prompt_keys": torch.tensor([p.key for p in prompts])}
    batch["num_tokens"] = mask.sum()
    if indices is not None:
        batch["sample_indices"] = torch.tensor(indices)
    return batch


@dataclass
class Group:
    """The answers sampled for one micro-batch of prompts, and what they earned."""

    prompts: list[Prompt]
    answers: list[np.ndarray]  # token ids of each answer, through its end token or stop string
    texts: list[str]  # each answer's text, cut at the first stop string
    rewards: np.ndarray  # (answers, scorers), unweighted
    total: np.ndarray  # weighted sum per answer
    sampling_logps: list[np.ndarray] | None = None  # engine vllm: the log-prob each answer token was drawn with


@dataclass
class _Window:
    """Figures summed over a logging window on this process."""

    sums: dict[str, float] = field(default_factory=dict)

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value


class Rollout:
    """GRPO's objective: the rewrite that samples and scores each micro-batch's answers, the loss on them, and
    the window's figures."""

    def __init__(self, cfg: RunConfig, data: TaskData, accelerator: Accelerator, stop_ids: list[int | None]) -> None:
        self.settings, self.seed = cfg.finetune.grpo, cfg.train.seed
        self.scorers: list[Scorer] = data.details["scorers"]
        self.tokenizer = data.details["tokenizer"]
        self.accelerator = accelerator
        self.base = data.details.get("base")  # the frozen start, the KL's reference when every weight trains
        self.prompts = {p.key: p for p in [*data.train, *data.val]}
        self.compiled: dict[str, Any] = {}
        if self.settings.compile_sampling:
            self.compiled = compiled_sampling(max((len(p) for p in self.prompts.values()), default=1))
        self.pad_id = int(self.tokenizer.pad_token_id)
        # the end of an answer: the model's end-of-turn tokens (a chat template's as well as EOS)
        self.stop_ids = {int(token) for token in stop_ids if token is not None}
        self.epsilon_high = self.settings.epsilon_high or (0.28 if self.settings.loss == "dapo" else None)
        self.window = _Window()
        self.window_began: float | None = None  # when the window's first step began
        # summed on the device by the loss: KL, answer tokens with a KL, tokens where the clip binds, answer tokens;
        # with vLLM's sampling log-probs: |policy - vLLM| log-prob, tokens outside the weight's bounds, their tokens
        self.figures = torch.zeros(len(FIGURES), dtype=torch.float64, device=accelerator.device)
        self.kept: Kept | None = None  # the round's micro-batches, with num_iterations > 1
        self.autocast = autocast_context(accelerator)
        # engine vllm: built at the first step that samples, handed the weights once per step
        self.vllm_shape = (cfg.finetune.max_length, compute_dtype(cfg))
        self.vllm: VllmSampler | None = None
        self.synced_step: int | None = None

    # ------------------------------------------------------------------ sampling
    def __call__(self, model: Any, batch: Batch, step: int, micro: int) -> Batch:
        """The micro-batch of prompts becomes one of answers: sampled, scored, with per-token advantages."""
        policy = self.accelerator.unwrap_model(model)
        seed = ((self.seed * 1_000_003 + step) * 1009 + micro) * 131 + self.accelerator.process_index
        start = time.perf_counter()
        self.window_began = self.window_began or start
        if self.settings.engine == "vllm" and self.synced_step != step:
            if self.vllm is None:
                processes = self.accelerator.num_processes
                self.vllm = VllmSampler(policy, *self.vllm_shape, self.settings.vllm_memory, self.seed, processes)
            self.vllm.sync(policy)
            self.synced_step = step
        group = self.sample(policy, batch, seed, greedy=False)
        seconds = time.perf_counter() - start
        advantages = group_advantages(group.total, self.settings.generations, self.settings.loss)
        corrected = group.sampling_logps if self.settings.vllm_correction != "none" else None
        new = answer_rows([p.ids for p in group.prompts], group.answers, advantages, self.pad_id, self.settings.loss,
                          corrected)  # fmt: skip
        if self.settings.beta > 0:
            new["ref_logps"] = self._answer_logps(policy, new, reference=True)
        if self.settings.num_iterations > 1:  # the ratio's denominator on the steps that learn from them again
            new["old_logps"] = self._answer_logps(policy, new, reference=False)
            self.kept = Kept(step, []) if micro == 0 else self.kept
            self.kept.batches.append(dict(new))  # type: ignore[union-attr]
        self._record(group, seconds, int(new["num_tokens"]))
        return new

    # ------------------------------------------------------------------ num_iterations > 1
    def replayed(self, step: int) -> list[Batch] | None:
        """The micro-batches of a step that learns again from its round's answers; None for a step that samples."""
        if (step - 1) % self.settings.num_iterations == 0:
            return None
        kept, rounds = self.kept, self.settings.num_iterations
        assert kept is not None and (kept.step - 1) // rounds == (step - 1) // rounds, "the round's answers are kept"
        self.window_began = self.window_began or time.perf_counter()
        self.window.add(train_tokens=float(sum(int(b["num_tokens"]) for b in kept.batches)))
        return [dict(b) for b in kept.batches]

    def state_dict(self, step: int) -> dict[str, Any] | None:
        """What a checkpoint after `step` keeps on this process: the round's micro-batches, when a step of the round
        is still to come."""
        if step % self.settings.num_iterations == 0 or self.kept is None:
            return None
        return {"step": self.kept.step, "batches": self.kept.batches}

    def load_state(self, states: list[Any], step: int, rank: int, where: str) -> None:
        """Take the round's micro-batches back from the checkpoint after `step`, when that step is inside one."""
        if step % self.settings.num_iterations == 0:
            return
        where_round = (
            f"{where}: step {step} is inside a round of finetune.grpo.num_iterations={self.settings.num_iterations}"
        )
        if states and len(states) != self.accelerator.num_processes:
            raise UserError(
                f"{where_round} whose answers were sampled by {len(states)} process(es); resume it on "
                f"{len(states)} process(es), or from a checkpoint at a multiple of num_iterations"
            )
        if not states or states[rank] is None:
            raise UserError(
                f"{where_round}, but the checkpoint holds none of its answers (written with another num_iterations); "
                "resume from a checkpoint at a multiple of num_iterations"
            )
        kept = states[rank]
        self.kept = Kept(int(kept["step"]), list(kept["batches"]))

    @torch.no_grad()
    def sample(self, policy: Any, batch: Batch, seed: int, greedy: bool) -> Group:
        settings = self.settings
        prompts = [self.prompts[int(key)] for key in batch["prompt_keys"]]
        copies = 1 if greedy else settings.generations
        if self.vllm is not None and not greedy:  # (validation's greedy answers stay with generate)
            drawn = self.vllm.sample([p.ids for p in prompts], copies, seed, settings, self.stop_ids)
            return self._scored(prompts, copies, [ids for ids, _ in drawn], [logps for _, logps in drawn])
        device = self.accelerator.device
        was_training = policy.training
        policy.eval()
        options: dict[str, Any] = (
            {"do_sample": False}
            if greedy
            else {
                "do_sample": True,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "top_k": settings.top_k,
            }
        )
        ids, mask = batch["prompt_ids"], batch["prompt_mask"]
        if self.compiled and not greedy:  # (validation's greedy answers stay eager: another batch size, rare)
            options.update(self.compiled["options"])
            width = self.compiled["prompt_width"]
            ids, mask = (F.pad(t, (width - t.shape[1], 0), value=v) for t, v in ((ids, self.pad_id), (mask, 0)))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = policy.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=settings.max_new_tokens,
                num_return_sequences=copies,
                eos_token_id=sorted(self.stop_ids) or None,
                pad_token_id=self.pad_id,
                **options,
            )
        policy.train(was_training)
        return self._scored(prompts, copies, list(out[:, ids.shape[1] :].cpu().numpy()))

    def _scored(
        self, prompts: list[Prompt], copies: int, rows: list[np.ndarray], logps: list[np.ndarray] | None = None
    ) -> Group:
        """The sampled token rows (`copies` per prompt, in order) cut at their ends (and their sampling log-probs
        with them) and scored."""
        answers, texts = [], []
        for row in rows:
            answer, text = self._cut(row)
            answers.append(answer)
            texts.append(text)
        expanded = [p for p in prompts for _ in range(copies)]
        rewards = self.score(expanded, texts)
        weights = np.asarray([scorer.weight for scorer in self.scorers])
        if logps is not None:
            logps = [row[: len(answer)] for row, answer in zip(logps, answers, strict=True)]
        return Group(expanded, answers, texts, rewards, rewards @ weights, logps)

    def _cut(self, tokens: np.ndarray) -> tuple[np.ndarray, str]:
        """An answer's tokens through its first end token or the token that completes a stop string; its text
        cut before the stop string."""
        end = len(tokens)
        for i, token in enumerate(tokens):
            if int(token) in self.stop_ids:
                end = i + 1
                break
        if self.settings.stop:
            for i in range(1, end + 1):
                text = str(self.tokenizer.decode(tokens[:i], skip_special_tokens=True))
                if any(stop in text for stop in self.settings.stop):
                    end = i
                    break
        text = str(self.tokenizer.decode(tokens[:end], skip_special_tokens=True))
        for stop in self.settings.stop:
            if stop in text:
                text = text[: text.index(stop)]
        return tokens[:end].astype(np.int64), text

    def score(self, prompts: list[Prompt], texts: list[str]) -> np.ndarray:
        rows, wheres = [p.row for p in prompts], [p.where for p in prompts]
        columns = [scorer.score([p.text for p in prompts], texts, rows, wheres) for scorer in self.scorers]
        return np.asarray(columns, dtype=np.float64).T

    @torch.no_grad()
    def _answer_logps(self, policy: Any, batch: Batch, reference: bool) -> torch.Tensor:
        """Per-token log-probs of the answers, in eval mode under the run's autocast: the policy's as it sampled
        them, or the starting model's (the frozen copy of the start, or the base with LoRA's adapters off)."""
        device = self.accelerator.device
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        model = self.base if reference and self.base is not None else policy
        was_training = model.training
        model.eval()
        with self.autocast(), policy.disable_adapter() if reference and self.base is None else nullcontext():
            logits = model(**inputs).logits
        model.train(was_training)
        return token_logps(logits, batch["labels"].to(device), self.settings.temperature).cpu()

    # ------------------------------------------------------------------ the loss
    def count_targets(self, batch: Batch) -> int:
        return loss_normalizer(batch, self.settings.loss, self.settings.max_new_tokens)

    def loss(self, logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        out = surrogate_loss(logits, batch, self.settings, self.epsilon_high)
        # summed in place on the device (no host sync, no graph break); read when the window closes
        tokens = out.trained.detach().to(self.figures.dtype)
        zero = torch.zeros_like(tokens)
        kl = (out.kl.detach().to(tokens.dtype), tokens) if out.kl is not None else (zero, zero)
        gap = (zero, zero, zero)
        if out.gap is not None and out.bound is not None:
            gap = (out.gap.to(tokens.dtype), out.bound.to(tokens.dtype), tokens)
        self.figures.add_(torch.stack([*kl, out.clipped.detach().to(tokens.dtype), tokens, *gap]))
        return out.total, out.trained

    def evaluate(self, model: Any, batches: list[Batch], accelerator: Accelerator) -> dict[str, Any]:
        """Greedy answers to the validation prompts, scored: val_reward (and each scorer's); val_loss is its
        negative, so lower is better for early stopping."""
        policy = accelerator.unwrap_model(model)
        totals, columns = [], []
        for batch in batches:
            group = self.sample(policy, batch, seed=self.seed, greedy=True)
            totals.append(group.total)
            columns.append(group.rewards)
        total = torch.tensor(float(np.concatenate(totals).sum()), device=accelerator.device, dtype=torch.float64)
        count = torch.tensor(float(sum(len(t) for t in totals)), device=accelerator.device, dtype=torch.float64)
        per = torch.tensor(np.concatenate(columns).sum(axis=0), device=accelerator.device, dtype=torch.float64)
        total, count, per = (accelerator.reduce(x, reduction="sum") for x in (total, count, per))
        reward = float(total / count)
        result = {"val_loss": -reward, "val_reward": reward}
        result.update({f"val_reward_{s.name}": float(v / count) for s, v in zip(self.scorers, per, strict=True)})
        return result

    # ------------------------------------------------------------------ figures
    def _record(self, group: Group, seconds: float, rows_tokens: int) -> None:
        groups = group.total.reshape(-1, self.settings.generations)
        lengths = [len(a) for a in group.answers]
        self.window.add(
            answers=len(lengths),
            prompts=len(groups),
            reward=float(group.total.sum()),
            squared=float((group.total**2).sum()),
            same=float((groups.max(1) == groups.min(1)).sum()),
            answer_tokens=float(sum(lengths)),
            sample_seconds=seconds,
            train_tokens=float(rows_tokens),
            truncated=float(sum(n == self.settings.max_new_tokens for n in lengths)),
        )
        for k, scorer in enumerate(self.scorers):
            column = group.rewards[:, k]
            self.window.add(**{f"reward_{scorer.name}": float(column.sum()), f"squared_{scorer.name}": column @ column})

    def take_metrics(self) -> dict[str, float]:
        """The window's figures (every process's, summed), then a fresh window."""
        if self.window_began is not None:  # the window's wall time; what sampling did not take, training took
            self.window.add(wall_seconds=time.perf_counter() - self.window_began)
            self.window_began = None
        self.window.add(**dict(zip(FIGURES, self.figures.tolist(), strict=True)))
        self.figures.zero_()
        keys = sorted(self.window.sums)
        values = torch.tensor([self.window.sums[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        sums = dict(zip(keys, values.tolist(), strict=True))
        self.window = _Window()
        processes = self.accelerator.num_processes
        metrics: dict[str, float] = {}
        if sums.get("trained"):
            metrics["clip_fraction"] = sums["clipped"] / sums["trained"]
        if sums.get("kl_tokens"):
            metrics["kl"] = sums["kl"] / sums["kl_tokens"]
        if sums.get("sampled_tokens"):  # engine vllm: how far its sampling is from the policy's, and what it cost
            metrics["vllm_logp_gap"] = sums["gap"] / sums["sampled_tokens"]
            metrics["vllm_weight_bound"] = sums["bound"] / sums["sampled_tokens"]
        if sums.get("train_tokens"):  # prompt + answer tokens of the training rows per second outside sampling
            training = sums["wall_seconds"] - sums.get("sample_seconds", 0.0)
            metrics["train_tokens_per_s"] = sums["train_tokens"] / max(training / processes, 1e-9)
        answers = sums.get("answers", 0.0)
        if not answers:  # a window of steps that learned from earlier answers again (num_iterations > 1)
            return metrics

        def spread(total: float, squared: float) -> float:
            return math.sqrt(max(squared / answers - (total / answers) ** 2, 0.0))

        metrics |= {
            "reward": sums["reward"] / answers,
            "reward_std": spread(sums["reward"], sums["squared"]),
            "same_reward_share": sums["same"] / sums["prompts"],
            "answer_tokens_mean": sums["answer_tokens"] / answers,
            "answers_at_max_tokens": sums["truncated"] / answers,
            # all processes together (as tokens_per_s): answer tokens per second of sampling
            "sample_tokens_per_s": sums["answer_tokens"] / max(sums["sample_seconds"] / processes, 1e-9),
        }
        for name in (scorer.name for scorer in self.scorers):
            metrics[f"reward_{name}"] = sums[f"reward_{name}"] / answers
            metrics[f"reward_{name}_std"] = spread(sums[f"reward_{name}"], sums[f"squared_{name}"])
        return metrics


FIGURES = ("kl", "kl_tokens", "clipped", "trained", "gap", "bound", "sampled_tokens")


@dataclass
class Kept:
    """The micro-batches of answers sampled at `step`, which the rest of its round learns from again."""

    step: int
    batches: list[Batch]


def compiled_sampling(prompt_width: int) -> dict[str, Any]:
    """`generate`'s options for a static KV cache and a compiled decoding step, and the width every prompt is
    left-padded to: with the batch's shapes fixed the step compiles once. transformers compiles it itself on GPUs;
    elsewhere (the CPU suite) its CompileConfig's `_compile_all_devices` asks for it."""
    from transformers.generation.configuration_utils import CompileConfig

    config = CompileConfig(fullgraph=False, dynamic=False)
    config._compile_all_devices = True  # type: ignore[assignment]
    return {"options": {"cache_implementation": "static", "compile_config": config}, "prompt_width": prompt_width}


def _shift(values: torch.Tensor, fill: float) -> torch.Tensor:
    """Position t's value for the token at t+1 (the target it predicts)."""
    return F.pad(values[:, 1:], (0, 1), value=fill)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(rows, positions) log-prob of each target token (position t predicts labels[t+1]) in float32, at the
    sampling temperature; 0 where there is no target."""
    targets = _shift(labels, IGNORE)
    flat = (logits.float() / temperature).flatten(0, 1)
    logps = -F.cross_entropy(flat, targets.flatten(), ignore_index=IGNORE, reduction="none")
    return logps.view(targets.shape)


def group_advantages(total: np.ndarray, generations: int, loss: str) -> np.ndarray:
    """Each answer's advantage within its prompt's group (consecutive runs of `generations` answers): TRL's
    (r - mean) / (unbiased std + 1e-4) for grpo and dapo, r - mean for dr_grpo, r - the others' mean for rloo."""
    groups = total.reshape(-1, generations)
    if loss == "rloo":
        return (groups - (groups.sum(axis=1, keepdims=True) - groups) / (generations - 1)).reshape(-1)
    centred = groups - groups.mean(axis=1, keepdims=True)
    if loss == "dr_grpo":
        return centred.reshape(-1)
    return (centred / (groups.std(axis=1, ddof=1, keepdims=True) + 1e-4)).reshape(-1)


def answer_rows(
    prompts: list[np.ndarray],
    answers: list[np.ndarray],
    advantages: np.ndarray,
    pad_id: int,
    loss: str,
    sampling_logps: list[np.ndarray] | None = None,
) -> Batch:
    """One row per answer, prompt + answer, right-padded (each row's positions start at 0, as in sampling); the
    answer tokens are the targets and carry their answer's advantage, and a weight: grpo averages each answer's
    tokens, the other losses weigh every token alike. With `sampling_logps` (vLLM's), each answer token carries the
    log-prob it was drawn with."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    ids = torch.full((len(answers), width), pad_id, dtype=torch.long)
    labels = torch.full((len(answers), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(answers), width), dtype=torch.long)
    advantage = torch.zeros((len(answers), width), dtype=torch.float32)
    weight = torch.zeros((len(answers), width), dtype=torch.float32)
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        start, end = len(prompt), len(prompt) + len(answer)
        ids[i, :start], ids[i, start:end] = torch.from_numpy(prompt), torch.from_numpy(answer)
        labels[i, start:end], mask[i, :end] = torch.from_numpy(answer), 1
        advantage[i, :end] = float(advantages[i])
        weight[i, :end] = 1.0 / max(len(answer), 1) if loss == "grpo" else 1.0
    rows = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "advantages": advantage,
        "token_weight": weight,
        "answers": torch.tensor(len(answers)),
        "num_tokens": mask.sum(),
    }
    if sampling_logps is not None:
        sampled = torch.zeros((len(answers), width), dtype=torch.float32)
        for i, (prompt, logps) in enumerate(zip(prompts, sampling_logps, strict=True)):
            sampled[i, len(prompt) : len(prompt) + len(logps)] = torch.from_numpy(logps)
        rows["sampling_logps"] = sampled
    return rows


def loss_normalizer(batch: Batch, loss: str, max_new_tokens: int) -> int:
    """What a micro-batch adds to the step's divisor: answers (grpo), answers x max_new_tokens (dr_grpo) or answer
    tokens (dapo, rloo). The loop sums it over the step's micro-batches and processes."""
    answers = int(batch["answers"])
    if loss == "grpo":
        return answers
    if loss == "dr_grpo":
        return answers * max_new_tokens
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class Surrogate(NamedTuple):
    """What the loss sums over a micro-batch's answer tokens."""

    total: torch.Tensor  # the weighted sum of PPO's clipped surrogate, plus beta x KL
    trained: torch.Tensor  # answer tokens
    kl: torch.Tensor | None  # the KL's sum, when there is a reference
    clipped: torch.Tensor  # tokens where the clip binds
    gap: torch.Tensor | None = None  # with vLLM's sampling log-probs: the sum of |policy - vLLM| per token
    bound: torch.Tensor | None = None  # ... and the tokens whose importance weight is outside its bounds


def surrogate_loss(logits: torch.Tensor, batch: Batch, settings: Any, epsilon_high: float | None) -> Surrogate:
    logps = token_logps(logits, batch["labels"], settings.temperature)
    trained = _shift(batch["labels"], IGNORE) != IGNORE
    advantage, weight = _shift(batch["advantages"], 0.0), _shift(batch["token_weight"], 0.0)
    # the ratio to the sampling policy: 1 in value on the step that sampled (its gradient is the policy gradient),
    # against the kept log-probs on the steps that learn from the answers again (num_iterations > 1)
    old = batch.get("old_logps", logps.detach())
    ratio = torch.exp(logps - old)
    low, high = 1 - settings.epsilon, 1 + (epsilon_high or settings.epsilon)
    clipped = torch.clamp(ratio, low, high)
    per_token = -torch.min(ratio * advantage, clipped * advantage)
    # where the clip binds (no gradient from the token): past the bound in the advantage's direction (TRL's)
    binds = ((ratio < low) & (advantage < 0)) | ((ratio > high) & (advantage > 0))
    gap = bound = None
    if "sampling_logps" in batch:  # drawn by vLLM: weighed by the policy's probability over vLLM's (before the KL)
        # (a NaN draw goes uncorrected)
        drift = torch.where(trained, torch.nan_to_num(old - _shift(batch["sampling_logps"], 0.0), nan=0.0), 0.0)
        correction, outside = sampling_weights(drift, settings)
        per_token = per_token * correction
        gap, bound = drift.abs().sum(), (outside & trained).sum()
    kl = None
    if "ref_logps" in batch:
        delta = batch["ref_logps"] - logps  # both: position t's log-prob of token t + 1
        per_token_kl = torch.exp(delta) - delta - 1
        # times the ratio (1 in value): the sampled-answer estimate of the KL's gradient is then unbiased (TRL's
        # use_bias_correction_kl, its default)
        per_token = per_token + settings.beta * per_token_kl * ratio
        kl = torch.where(trained, per_token_kl, 0.0).sum()
    total = torch.where(trained, per_token * weight, 0.0).sum()
    return Surrogate(total, trained.sum(), kl, (binds & trained).sum(), gap, bound)


def sampling_weights(drift: torch.Tensor, settings: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance weight of each answer token drawn by vLLM (TRL's vllm_importance_sampling_mode), from `drift`,
    the policy's log-prob less vLLM's (0 off the answers): the policy's probability over vLLM's, of the answer
    (sequence_) or the token (token_), set to 0 outside [vllm_correction_min, vllm_correction_max] (_mask) or to
    the bound (_truncate); and where it was outside."""
    mode, low, high = settings.vllm_correction, settings.vllm_correction_min, settings.vllm_correction_max
    ratio = torch.exp(drift.sum(-1, keepdim=True) if mode.startswith("sequence") else drift)
    outside = torch.zeros_like(ratio, dtype=torch.bool)
    if low is not None:
        outside |= ratio < low
    if high is not None:
        outside |= ratio > high
    if mode.endswith("mask"):
        weights = ratio.masked_fill(outside, 0.0)
    else:
        weights = ratio if low is None and high is None else ratio.clamp(low, high)
    return weights, outside.expand_as(drift)
