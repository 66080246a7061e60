"""`--task distill`: SFT rows, with the loss on assistant/completion tokens taken from a teacher's distributions
(llmkit.train.distill) mixed with the data loss. The student is the `--model` being fine-tuned (full, LoRA or
freeze); to distill into a model built from a recipe, pretrain it with `--teacher` instead."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmkit.config import RunConfig
from llmkit.errors import UserError
from llmkit.train import distill
from llmkit.train.job import Objective
from llmkit.train.packing import collate_rows
from llmkit.train.tasks.base import Collate, LmLoss, Preparation, TaskData
from llmkit.train.tasks.sft import SFT

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase


class Distill(SFT):
    name = "distill"
    logits = "whole"

    def __init__(self) -> None:
        self.cache: distill.TeacherCache | None = None  # set by prepare when distill.top_k is given

    def load_data(self, cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
        if not cfg.distill.teacher:
            raise UserError("--task distill needs a teacher: pass --teacher MODEL (distill.teacher)")
        if cfg.distill.on_policy and cfg.distill.top_k:
            raise UserError(
                "distill.on_policy needs the live teacher (it scores the student's own samples); unset distill.top_k"
            )
        distill.check_teacher(cfg.distill, tokenizer, str(cfg.model.init_from))
        self.cache = None
        data = super().load_data(cfg, tokenizer)
        data.details.update(tokenizer=tokenizer, teacher=cfg.distill.teacher)
        if cfg.distill.top_k and cfg.distill.cache:
            key = distill.cache_key(cfg.distill, data.fingerprint, len(tokenizer))
            distill.check_given_cache(Path(cfg.distill.cache), key)
        return data

    def objective(
        self, model: Any, accelerator: Accelerator, data: TaskData, cfg: RunConfig, lm_loss: LmLoss
    ) -> Objective:
        tokenizer = data.details["tokenizer"]
        teacher = None if cfg.distill.top_k else self._teacher(cfg, data, accelerator)
        loss_fn = distill.distillation_loss(cfg.distill, len(tokenizer), teacher=teacher)
        eval_fn = distill.evaluation(cfg.distill, len(tokenizer), teacher)
        if not cfg.distill.on_policy:
            return Objective(loss_fn, eval_fn=eval_fn)
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        stop_ids = list(model.generation_config.eos_token_id or [tokenizer.eos_token_id])
        on_policy = distill.OnPolicy(cfg, data.train, tokenizer, stop_ids, cfg.finetune.max_length, attn, accelerator)
        return Objective(loss_fn, eval_fn=eval_fn, rewrite=on_policy)

    def collate(self, pad_id: int, attn_implementation: str) -> Collate:
        def collate(rows: list[list[Any]], indices: list[int] | None = None) -> dict[str, torch.Tensor]:
            batch = collate_rows(rows, pad_id, attn_implementation, indices)
            if self.cache is not None and indices is not None:
                grouped, at = [], 0
                for row in rows:
                    grouped.append(indices[at : at + len(row)])
                    at += len(row)
                batch.update(self.cache.rows(grouped, batch["input_ids"].shape[1]))
            return batch

        return collate

    def prepare(self, model: Any, run: Preparation) -> None:
        """With distill.top_k: the teacher's top-k over every training example, computed once (or reused)."""
        cfg, data, accelerator = run.cfg, run.data, run.accelerator
        if not cfg.distill.top_k:
            return
        tokenizer = data.details["tokenizer"]
        root = Path(cfg.distill.cache) if cfg.distill.cache else run.run_dir / "teacher_cache"
        key = distill.cache_key(cfg.distill, data.fingerprint, len(tokenizer))
        micro = cfg.train.micro_batch_size

        def batches(mine: list[int]) -> Any:
            for start in range(0, len(mine), micro):
                group = mine[start : start + micro]
                yield collate_rows([[data.train[i]] for i in group], int(tokenizer.pad_token_id), "sdpa", group)

        self.cache = distill.open_or_build_cache(
            root,
            key,
            [len(e.ids) for e in data.train],
            batches,
            lambda: self._teacher(cfg, data, accelerator),
            accelerator,
            given=cfg.distill.cache is not None,
        )

    def describe(self, data: TaskData, chat: Any) -> str:
        return f"{super().describe(data, chat)}, teacher {data.details.get('teacher', '-')}"

    def _teacher(self, cfg: RunConfig, data: TaskData, accelerator: Accelerator) -> Any:
        return distill.load_teacher(cfg, accelerator.device)
