"""Task evaluation from local files: multiple choice, generation, perplexity and classification.

Task files are read by llmkit.data.task_files (data-prep decontaminates against the same items).

Multiple choice is scored as lm-evaluation-harness scores it: the log-likelihood of `target_delimiter +
choice` after the prompt, the prompt/continuation split made on the tokens of the whole string; `acc` picks the
highest log-likelihood, `acc_norm` the highest log-likelihood per character of the choice. Requests (and
generation prompts) are sorted by length and batched, so padding is small.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from llmkit.console import progress_bar
from llmkit.data.task_files import TaskSpec, render_prompt, task_items
from llmkit.errors import UserError
from llmkit.scoring import MATCH_METRICS, answer_score


class LanguageModel:
    """A causal LM and its tokenizer, loaded once for every task."""

    def __init__(self, model_dir: Path) -> None:
        from llmkit.data.tokenizer import load_tokenizer
        from llmkit.eval.exported import load_for_eval
        from llmkit.models import model_context
        from llmkit.runs import find_tokenizer_dir

        self.model_dir = model_dir
        self.tokenizer = load_tokenizer(find_tokenizer_dir(model_dir))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_for_eval(model_dir).to(self.device).eval()
        self.context = model_context(self.model) or 2048

    def render(self, task: TaskSpec, item: dict[str, Any], where: str) -> str:
        return render_prompt(task, item, where, self.tokenizer)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-evaluation-harness's split: trailing spaces of the context move to the continuation; the
        continuation's tokens are those of the whole string after the context's tokens."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        context_ids = self.tokenizer(context, add_special_tokens=False)["input_ids"]
        if not context_ids:  # an empty prompt conditions on the end-of-text token, as the harness does
            return [int(self.tokenizer.eos_token_id)], whole
        return context_ids, whole[len(context_ids) :]

    @torch.no_grad()
    def loglikelihoods(self, requests: list[tuple[str, str]], batch_size: int, label: str) -> list[float]:
        """Sum of log-probabilities of each continuation given its context, batched by length."""
        encoded = [self.encode_pair(context, continuation) for context, continuation in requests]
        rows = []
        for context_ids, continuation_ids in encoded:
            tokens = (context_ids + continuation_ids)[-(self.context + 1) :]
            rows.append((tokens[:-1], tokens[-len(continuation_ids) :]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        scores = [0.0] * len(rows)
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        with progress_bar(label, len(rows), unit="requests") as update:
            for first in range(0, len(order), batch_size):
                chunk = order[first : first + batch_size]
                width = max(len(rows[i][0]) for i in chunk)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, index in enumerate(chunk):
                    inputs = rows[index][0]
                    ids[row, : len(inputs)] = torch.tensor(inputs)
                    mask[row, : len(inputs)] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
                for row, index in enumerate(chunk):
                    inputs, targets = rows[index]
                    positions = torch.arange(len(inputs) - len(targets), len(inputs))
                    picked = logprobs[row, positions, torch.tensor(targets)]
                    scores[index] = float(picked.double().sum())
                update(len(chunk))
        return scores

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        """Greedy answers to prompts of similar length at once: left-padded, so every answer starts together."""
        pad = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        rows = [
            self.tokenizer(p, add_special_tokens=False)["input_ids"][-(self.context - max_new_tokens) :]
            for p in prompts
        ]
        width = max(len(row) for row in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        output = self.model.generate(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        answers = []
        for row in output[:, width:]:
            text = str(self.tokenizer.decode(row, skip_special_tokens=True))
            for marker in stop:
                if marker and marker in text:
                    text = text[: text.index(marker)]
            answers.append(text)
        return answers


def run_multiple_choice(lm: LanguageModel, task: TaskSpec, batch_size: int) -> dict[str, Any]:
    items = task_items(task)
    requests: list[tuple[str, str]] = []
    spans: list[tuple[int, list[str]]] = []
    golds: list[int] = []
    for number, item in enumerate(items, 1):
        where = f"{task.source}: task {task.name}, item {number}"
        choices = item.get(task.choices_field)
        if not isinstance(choices, list) or len(choices) < 2:
            raise UserError(f"{where}: '{task.choices_field}' must be a list of at least two choices")
        answer = item.get(task.answer_field)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise UserError(
                f"{where}: '{task.answer_field}' must be the index of the right choice (0-{len(choices) - 1})"
            )
        prompt = lm.render(task, item, where)
        spans.append((len(requests), [str(choice) for choice in choices]))
        requests += [(prompt, task.target_delimiter + str(choice)) for choice in choices]
        golds.append(answer)
    scores = lm.loglikelihoods(requests, batch_size, f"{task.name}")
    correct = correct_norm = 0
    for (first, choices), gold in zip(spans, golds, strict=True):
        lls = scores[first : first + len(choices)]
        normalized = [ll / len(choice) for ll, choice in zip(lls, choices, strict=True)]
        correct += int(_argmax(lls) == gold)
        correct_norm += int(_argmax(normalized) == gold)
    return {"acc": correct / len(golds), "acc_norm": correct_norm / len(golds), "items": len(golds)}


def run_generation(lm: LanguageModel, task: TaskSpec, batch_size: int) -> dict[str, Any]:
    items = task_items(task)
    prompts, targets = [], []
    for number, item in enumerate(items, 1):
        where = f"{task.source}: task {task.name}, item {number}"
        if task.answer_field not in item:
            raise UserError(f"{where}: no '{task.answer_field}' field (fields: {', '.join(sorted(item))})")
        prompts.append(lm.render(task, item, where))
        targets.append(str(item[task.answer_field]))
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i]))  # similar lengths together: little padding
    outputs = [""] * len(items)
    with progress_bar(task.name, len(items), unit="items") as update:
        for first in range(0, len(order), batch_size):
            chunk = order[first : first + batch_size]
            for index, answer in zip(
                chunk, lm.generate([prompts[i] for i in chunk], task.max_new_tokens, task.stop), strict=True
            ):
                outputs[index] = answer
            update(len(chunk))
    where = f"{task.source}: task {task.name}"
    hits = [answer_score(output, target, task, where) == 1.0 for output, target in zip(outputs, targets, strict=True)]
    samples = [{"output": o, "target": t, "correct": h} for o, t, h in zip(outputs[:5], targets, hits, strict=False)]
    metric = MATCH_METRICS[task.match]
    return {metric: sum(hits) / len(items), "items": len(items), "samples": samples}


def _argmax(values: list[float]) -> int:
    """The first index of the largest value (numpy's rule, so ties resolve as the harness resolves them)."""
    best = 0
    for index, value in enumerate(values):
        if value > values[best]:
            best = index
    return best


def run_tasks(model_dir: Path, tasks: list[TaskSpec], batch_size: int = 16) -> dict[str, dict[str, Any]]:
    """Every task's metrics, keyed by task name."""
    from llmkit.eval.classification import evaluate_classifier, is_classifier
    from llmkit.eval.perplexity import evaluate

    results: dict[str, dict[str, Any]] = {}
    needs_lm = any(task.kind in ("multiple_choice", "generation") for task in tasks)
    classifier = is_classifier(model_dir)
    if needs_lm and classifier:
        raise UserError(f"{model_dir}: a classifier cannot answer multiple-choice or generation tasks")
    lm = LanguageModel(model_dir) if needs_lm else None
    for task in tasks:
        if task.kind == "multiple_choice" and lm is not None:
            results[task.name] = {"kind": task.kind, **run_multiple_choice(lm, task, batch_size)}
        elif task.kind == "generation" and lm is not None:
            results[task.name] = {"kind": task.kind, **run_generation(lm, task, batch_size)}
        else:
            if task.data is None:
                raise UserError(f"{task.source}: task {task.name}: {task.kind} tasks read a 'data' file")
            path = Path(task.base) / task.data
            if task.kind == "classification":
                if not classifier:
                    raise UserError(f"{model_dir}: not a classifier (no label map): cannot run task {task.name}")
                report = evaluate_classifier(model_dir, path, max(batch_size, 32), task.text_field)
                metrics = {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "items": report["examples"]}
            else:
                report = evaluate(model_dir, path, batch_size=batch_size, text_field=task.text_field)
                metrics = {
                    "perplexity": report["perplexity"],
                    "bits_per_char": report["bits_per_char"],
                    "tokens": report["tokens"],
                }
            results[task.name] = {"kind": task.kind, **metrics}
    return results


def flat_metrics(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """{"task.metric": value} for every numeric metric (counts excluded)."""
    flat = {}
    for name, metrics in results.items():
        for key, value in metrics.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key not in ("items", "tokens") and numeric and math.isfinite(value):
                flat[f"{name}.{key}"] = float(value)
    return flat
