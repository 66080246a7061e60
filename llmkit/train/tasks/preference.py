"""`--task dpo | orpo | simpo | kto`: preference tuning on pairs of answers to the same prompt (KTO: on single
answers labelled desirable or not).

Rows are `{prompt, chosen, rejected}` (strings or message lists) or whole conversations `{chosen, rejected}` that
share their beginning, read and encoded by llmkit.data.pairs: each answer like an SFT row, so what DPO prefers is
what SFT taught the model to stop with.

A pair is one unit of the loader: its chosen and rejected sequences sit side by side in a row, and with packing
many pairs share a row, each sequence under its own block of the causal mask (llmkit.train.packing), so the loss
of a packed batch equals the loss of its pairs one by one.

The reference model of DPO costs no memory during training: its log-probabilities of every pair are computed once,
by the model before its first step (for LoRA that is the base: new adapters add nothing), and kept in the run
directory (`reference_logps.npy`), which a resumed run reads instead of recomputing. ORPO and SimPO need no
reference.

KTO rows are `{prompt, completion, label: true/false}`. Each row is carried as a `Pair` too: its own sequence, and
a mismatched one (its prompt with the completion of the row before it, rotating within groups of
`train.micro_batch_size` rows, as TRL builds them) from which the batch estimates the KL term.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.config import PreferenceConfig, RunConfig
from llmkit.data.pairs import PAIR_FORMATS, UNPAIRED_FORMATS, Pair, encode_pair, encode_unpaired
from llmkit.errors import UserError
from llmkit.losses import IGNORE
from llmkit.train.job import Objective
from llmkit.train.packing import collate_rows, first_fit_decreasing
from llmkit.train.step import model_inputs
from llmkit.train.tasks.base import Collate, LmLoss, Preparation, Task, TaskData, data_fingerprint, split_examples

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

REFERENCE_FILE = "reference_logps.npy"


# --- rows -------------------------------------------------------------------------------------------------------


def load_unpaired(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    train_rows, val_rows, fmt = split_examples(cfg, UNPAIRED_FORMATS)
    labels = {row.label for row in train_rows}
    if labels != {True, False}:
        only = "desirable" if True in labels else "undesirable"
        raise UserError(f"{cfg.data.sources[0]}: every training row is {only}; KTO needs rows labelled true and false")
    group, max_length = max(2, cfg.train.micro_batch_size), cfg.finetune.max_length
    train = encode_unpaired(tokenizer, train_rows, max_length, group)
    val = encode_unpaired(tokenizer, val_rows, max_length, group)
    truncated = sum(p.chosen.truncated for p in train)
    settings = cfg.finetune.preference.model_dump(mode="json")
    return TaskData(train, val, fmt, data_fingerprint(cfg, settings, group), truncated)


def load_pairs(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    train_rows, val_rows, fmt = split_examples(cfg, PAIR_FORMATS)
    max_length = cfg.finetune.max_length
    train = [encode_pair(tokenizer, row, max_length) for row in train_rows]
    val = [encode_pair(tokenizer, row, max_length) for row in val_rows]
    truncated = sum(p.chosen.truncated or p.rejected.truncated for p in train)
    settings = cfg.finetune.preference.model_dump(mode="json")
    return TaskData(train, val, fmt, data_fingerprint(cfg, settings), truncated)


# --- batches and log-probs ------------------------------------------------------------------------------------------


def collate_pairs(rows: list[list[Pair]], pad_id: int, attn: str, indices: list[int] | None = None) -> dict:
    """Rows of pairs, each pair's chosen then rejected sequence side by side; `sequence` maps every position to
    its sequence (2k: the chosen answer of the batch's k-th pair, 2k+1 its rejected one; -1 padding)."""
    batch = collate_rows([[s for pair in row for s in (pair.chosen, pair.rejected)] for row in rows], pad_id, attn)
    sequence = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    k = 0
    for r, row in enumerate(rows):
        offset = 0
        for pair in row:
            for encoded in (pair.chosen, pair.rejected):
                sequence[r, offset : offset + len(encoded)] = k
                offset, k = offset + len(encoded), k + 1
    batch["sequence"] = sequence
    pairs = [pair for row in rows for pair in row]
    batch["pair_ids"] = torch.arange(len(pairs))  # its shape counts the pairs: no device read in the loss
    if all(pair.reference is not None for pair in pairs):
        batch["reference"] = torch.tensor([pair.reference for pair in pairs], dtype=torch.float64)
    if pairs and pairs[0].desirable is not None:
        batch["desirable"] = torch.tensor([bool(pair.desirable) for pair in pairs])
    if indices is not None:
        batch["sample_indices"] = torch.tensor(indices)
    return batch


def sequence_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each sequence's trained tokens, their count), float32, in the order of `sequence`.

    Position t predicts token t+1; the softmax is taken in float32 a slice of rows at a time."""
    # The targets are shifted, not the logits (a slice of them would copy the largest tensor); chunks are split off
    # by a row count fixed by the vocabulary, so a compiled graph keeps the batch's lengths symbolic.
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE).flatten()
    owner = F.pad(batch["sequence"][:, 1:], (0, 1), value=-1).flatten()
    sequences = 2 * batch["pair_ids"].numel()
    step = max(1, 2**26 // logits.shape[-1])
    flat = logits.flatten(0, 1)
    logps = torch.cat(
        [
            -F.cross_entropy(rows.float(), row_targets, ignore_index=IGNORE, reduction="none")
            for rows, row_targets in zip(flat.split(step), targets.split(step), strict=True)
        ]
    )
    trained = (targets != IGNORE) & (owner >= 0)
    index = owner.clamp(min=0)
    sums = torch.zeros(sequences, device=logits.device).index_add(0, index, torch.where(trained, logps, 0.0))
    counts = torch.zeros(sequences, device=logits.device).index_add(0, index, trained.float())
    return sums, counts


# --- the objectives -------------------------------------------------------------------------------------------------


@dataclass
class PairScores:
    """Per pair: the loss, and the implicit rewards and log-probs that evaluation reports."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    right: torch.Tensor | None = None  # per row, the reward is on the right side (default: chosen above rejected)

    def hits(self) -> torch.Tensor:
        return self.right if self.right is not None else self.chosen_rewards > self.rejected_rewards


def dpo_losses(
    policy: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor, cfg: PreferenceConfig
) -> PairScores:
    """DPO and its variants from summed log-probs; `policy`, `counts`: (2P,) chosen/rejected interleaved;
    `reference`: (P, 2)."""
    chosen, rejected = policy[0::2], policy[1::2]
    chosen_ratio = chosen - reference[:, 0].to(chosen.dtype)
    rejected_ratio = rejected - reference[:, 1].to(chosen.dtype)
    delta, beta, smoothing = chosen_ratio - rejected_ratio, cfg.beta, cfg.label_smoothing
    if cfg.loss == "sigmoid":  # DPO; with label smoothing, conservative DPO
        losses = -(1 - smoothing) * F.logsigmoid(beta * delta) - smoothing * F.logsigmoid(-beta * delta)
    elif cfg.loss == "robust":  # rDPO: unbiased under preference noise of rate `smoothing`
        losses = (-(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)) / (
            1 - 2 * smoothing
        )
    elif cfg.loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:  # ipo, on log-ratios averaged over each answer's tokens
        mean_delta = chosen_ratio / counts[0::2].clamp(min=1) - rejected_ratio / counts[1::2].clamp(min=1)
        losses = (mean_delta - 1 / (2 * beta)) ** 2
    return PairScores(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), chosen, rejected)


def simpo_losses(policy: torch.Tensor, counts: torch.Tensor, cfg: PreferenceConfig) -> PairScores:
    """SimPO: no reference; the reward is beta times the mean log-prob of the answer, with a target margin."""
    mean = policy / counts.clamp(min=1)
    chosen, rejected = mean[0::2], mean[1::2]
    logits = chosen - rejected - cfg.simpo_gamma / cfg.beta
    losses = -(1 - cfg.label_smoothing) * F.logsigmoid(cfg.beta * logits) - cfg.label_smoothing * F.logsigmoid(
        -cfg.beta * logits
    )
    return PairScores(losses, cfg.beta * chosen.detach(), cfg.beta * rejected.detach(), chosen, rejected)


def orpo_losses(policy: torch.Tensor, counts: torch.Tensor, cfg: PreferenceConfig) -> PairScores:
    """ORPO's odds-ratio term (negated: a loss), on mean log-probs; the chosen answers' NLL is added by the caller."""
    mean = (policy / counts.clamp(min=1)).float()
    chosen, rejected = mean[0::2], mean[1::2]
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    losses = -cfg.beta * F.logsigmoid(log_odds)
    return PairScores(losses, cfg.beta * chosen.detach(), cfg.beta * rejected.detach(), chosen, rejected)


def kto_losses(
    policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor, cfg: PreferenceConfig
) -> tuple[PairScores, torch.Tensor]:
    """KTO: `policy` (2P,) holds each row's own sequence and its mismatched one, interleaved; the KL term is the
    batch's mean policy/reference log-ratio on the mismatched sequences (detached, at least 0). Returns the scores
    (chosen: desirable rows, rejected: undesirable ones) and the KL estimate."""
    own, mismatched = policy[0::2], policy[1::2]
    ratio = own - reference[:, 0].to(own.dtype)
    kl = (mismatched - reference[:, 1].to(own.dtype)).mean().detach().clamp(min=0)
    losses = torch.where(
        desirable,
        cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (ratio - kl))),
        cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (kl - ratio))),
    )
    rewards = cfg.beta * ratio.detach()
    right = torch.where(desirable, rewards > 0, rewards < 0)  # a desirable answer gained, an undesirable one lost
    scores = PairScores(losses, rewards[desirable], rewards[~desirable], own[desirable], own[~desirable], right)
    return scores, kl


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_scores(
    task: str, logits: torch.Tensor, batch: dict[str, torch.Tensor], cfg: PreferenceConfig
) -> tuple[PairScores, torch.Tensor]:
    """The pairs' scores and the batch's loss summed over pairs (ORPO: plus pairs x the chosen answers' mean NLL)."""
    policy, counts = sequence_logps(logits, batch)
    if task == "dpo":
        if "reference" not in batch:
            raise RuntimeError("DPO batch without reference log-probs: PreferenceTask.prepare was not run")
        scores = dpo_losses(policy, batch["reference"].to(policy.device), counts, cfg)
        return scores, scores.losses.sum()
    if task == "simpo":
        scores = simpo_losses(policy, counts, cfg)
        return scores, scores.losses.sum()
    if task == "kto":
        scores, _ = kto_losses(policy, batch["reference"].to(policy.device), batch["desirable"], cfg)
        return scores, scores.losses.sum()
    scores = orpo_losses(policy, counts, cfg)
    chosen_nll = -policy[0::2].sum() / counts[0::2].sum().clamp(min=1)
    return scores, scores.losses.sum() + chosen_nll * scores.losses.numel()


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["pair_ids"].numel()


# --- the task ---------------------------------------------------------------------------------------------------


class PreferenceTask(Task):
    """DPO (with the sigmoid, IPO, hinge and robust losses), ORPO or SimPO on pairs."""

    sequences_per_row = 2
    logits = "whole"  # the loss needs each sequence's log-prob: the head is not fused with it

    def __init__(self, name: str) -> None:
        self.name = name  # type: ignore[misc]
        self.needs_reference = name in ("dpo", "kto")  # ORPO and SimPO are reference-free

    def load_data(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        return load_unpaired(cfg, tokenizer) if self.name == "kto" else load_pairs(cfg, tokenizer)

    def collate(self, pad_id: int, attn_implementation: str) -> Collate:
        return lambda rows, indices=None: collate_pairs(rows, pad_id, attn_implementation, indices)

    def objective(
        self, model: Any, accelerator: Accelerator, data: TaskData, cfg: RunConfig, lm_loss: LmLoss
    ) -> Objective:
        settings, task = cfg.finetune.preference, self.name

        def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            scores, total = pair_scores(task, logits, batch, settings)
            return total, torch.tensor(scores.losses.numel(), device=logits.device)

        def eval_fn(model: Any, batches: list[dict[str, torch.Tensor]], acc: Accelerator) -> dict[str, Any]:
            return evaluate_pairs(model, batches, acc, task, settings)

        return Objective(loss_fn, count_pairs, eval_fn)

    def prepare(self, model: Any, run: Preparation) -> None:
        if self.needs_reference:
            row_length = run.cfg.finetune.max_length * self.sequences_per_row
            attach_reference(
                model,
                run.accelerator,
                run.data,
                run.run_dir,
                run.resumed,
                run.cfg.train.micro_batch_size,
                row_length,
                run.collate,
            )

    def plan_notes(self, cfg: RunConfig) -> list[str]:
        notes = [
            f"{self.name}: a row holds a pair's two answers (2 x finetune.max_length tokens); the logits are "
            "materialized for the pairs' log-probs (counted in activations)"
        ]
        if self.needs_reference:
            notes.append(
                f"{self.name}: no reference model in memory; its log-probs take one forward pass over the "
                "rows before the first step (about a third of an epoch's compute) and 16 bytes a pair on disk "
                f"(RUN/{REFERENCE_FILE}, reused on resume)"
            )
        return notes

    def describe(self, data: TaskData, chat: Any) -> str:
        return f"template {chat.name if chat else '-'}, {self.name} on chosen/rejected pairs"


def attach_reference(
    model: Any,
    accelerator: Accelerator,
    data: TaskData,
    run_dir: Path,
    resumed: bool,
    micro: int,
    row_length: int,
    collate: Collate,
) -> None:
    """Every pair's reference log-probs: read from the run directory, or computed by the model before its first
    step (every process computes all of them the same way, in packed rows of `row_length` tokens, `micro` rows a
    forward pass, as training batches them) and saved there by the main process."""
    from llmkit.atomic import write_bytes

    pairs = [*data.train, *data.val]
    path = run_dir / REFERENCE_FILE
    if resumed:
        if not path.exists():
            raise UserError(
                f"{path}: missing; this run's reference log-probs are gone, so it cannot resume exactly; "
                "start it again with --overwrite"
            )
        values = np.load(path)
        if values.shape != (len(pairs), 2):
            raise UserError(
                f"{path}: holds {values.shape[0]} pairs, the data has {len(pairs)}; start again with --overwrite"
            )
    else:
        values = np.zeros((len(pairs), 2), dtype=np.float64)
        rows = first_fit_decreasing(np.asarray([len(pair) for pair in pairs]), row_length)
        model.eval()
        with torch.no_grad():
            for start in range(0, len(rows), micro):
                chunk = rows[start : start + micro]
                batch = collate([[pairs[i] for i in row] for row in chunk])
                inputs = {k: v.to(accelerator.device) for k, v in batch.items() if k != "sample_indices"}
                sums, _ = sequence_logps(model(**model_inputs(inputs)).logits, inputs)
                values[[i for row in chunk for i in row]] = sums.double().view(-1, 2).cpu().numpy()
        model.train()
        if accelerator.is_main_process:
            buffer = io.BytesIO()
            np.save(buffer, values)
            write_bytes(path, buffer.getvalue())
        accelerator.wait_for_everyone()
    for pair, (chosen, rejected) in zip(pairs, values.tolist(), strict=True):
        pair.reference = (chosen, rejected)


@torch.no_grad()
def evaluate_pairs(
    model: Any, batches: list[dict[str, torch.Tensor]], acc: Accelerator, task: str, cfg: PreferenceConfig
) -> dict[str, Any]:
    """Mean loss, mean implicit rewards of chosen and rejected answers (KTO: of desirable and undesirable rows),
    reward accuracy (chosen strictly above rejected; KTO: a reward of the label's sign), margin and mean summed
    log-probs, over all processes."""
    model.eval()
    sums = torch.zeros(9, device=acc.device, dtype=torch.float64)
    for batch in batches:
        batch = {key: value.to(acc.device) for key, value in batch.items() if key != "sample_indices"}
        scores, total = pair_scores(task, model(**model_inputs(batch)).logits, batch, cfg)
        values: list[Any] = [
            total,
            scores.losses.numel(),
            scores.hits().sum(),
            scores.chosen_rewards.sum(),
            scores.rejected_rewards.sum(),
            scores.chosen_logps.sum(),
            scores.rejected_logps.sum(),
            scores.chosen_rewards.numel(),
            scores.rejected_rewards.numel(),
        ]
        sums += torch.tensor([float(v) for v in values], device=acc.device, dtype=torch.float64)
    model.train()
    loss, rows, right, chosen, rejected, chosen_logps, rejected_logps, n_chosen, n_rejected = (
        float(v) for v in acc.reduce(sums, "sum")
    )
    rows, n_chosen, n_rejected = max(rows, 1.0), max(n_chosen, 1.0), max(n_rejected, 1.0)
    return {
        "val_loss": loss / rows,
        "val_rewards/chosen": chosen / n_chosen,
        "val_rewards/rejected": rejected / n_rejected,
        "val_rewards/accuracy": right / rows,
        "val_rewards/margin": chosen / n_chosen - rejected / n_rejected,
        "val_logps/chosen": chosen_logps / n_chosen,
        "val_logps/rejected": rejected_logps / n_rejected,
    }
