"""Knowledge distillation: a student learns a teacher's next-token distributions, not only the data's tokens.

The loss of a token is `alpha * T^2 * D(teacher || student) + (1 - alpha) * NLL(data)`, with both distributions
taken at temperature T and D one of forward KL, reverse KL or the generalized Jensen-Shannon divergence of GKD
(Agarwal et al. 2024; `beta` interpolates: 0 is forward KL, 1 reverse KL, TRL's `generalized_jsd_loss` gives the
same numbers). It is summed over the same target tokens as the data loss (assistant tokens of SFT rows, every
token of a pretraining block) and normalized by their count, like every llmkit loss.

The teacher runs live (forward in the compute dtype, no gradients, every process holding it whole) or, with
`distill.top_k`, is read from a cache of its top-k log-probabilities per token, written once before the first step
(`RUN/teacher_cache/`, or `distill.cache`, which later runs reuse). With a cache, both distributions are compared
on the teacher's k tokens plus one bucket for the rest of the vocabulary: exact when the teacher's mass outside its
top k is zero, and never more than the full divergence (merging outcomes cannot increase a KL or JSD).

Distributions cover the tokenizer's tokens only (the rows an embedding is padded with are ignored), so a teacher
and a student may differ in padded vocabulary size but must share the tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from llmkit.atomic import write_json
from llmkit.config import DistillConfig, RunConfig
from llmkit.console import info
from llmkit.errors import UserError
from llmkit.losses import IGNORE, causal_lm_nll, shifted_targets
from llmkit.train.job import Objective

if TYPE_CHECKING:
    from accelerate import Accelerator
    from transformers import PreTrainedTokenizerBase

CACHE_VERSION = 1
ROWS_PER_CHUNK = 2048  # target tokens whose full-vocabulary distributions are compared at once


# ---------------------------------------------------------------------------------------------------- divergences
def divergence(student: torch.Tensor, teacher: torch.Tensor, kind: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between two log-probability tables [rows, outcomes] (float32): forward KL
    KL(teacher || student), reverse KL KL(student || teacher), or the generalized JSD with mixture
    `beta * teacher + (1 - beta) * student`."""
    if kind == "forward_kl":
        return _kl(teacher, student)
    if kind == "reverse_kl":
        return _kl(student, teacher)
    mixture = torch.logsumexp(torch.stack([teacher + math.log(beta), student + math.log1p(-beta)]), dim=0)
    return beta * _kl(teacher, mixture) + (1 - beta) * _kl(student, mixture)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; outcomes p gives probability 0 add nothing."""
    terms = p.exp() * (p - q)
    return torch.where(torch.isfinite(p), terms, torch.zeros_like(terms)).sum(-1)


def with_rest(log_probs: torch.Tensor) -> torch.Tensor:
    """Top-k log-probabilities [rows, k] and one more column: the log of the mass outside them."""
    rest = (1 - log_probs.exp().sum(-1, keepdim=True)).clamp(min=1e-20)
    return torch.cat([log_probs, rest.log()], dim=-1)


def token_divergence(
    student_logits: torch.Tensor,
    teacher: dict[str, torch.Tensor],
    cfg: DistillConfig,
    vocab: int,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed divergence over rows of student logits [rows, V'] against the teacher's rows: `logits` (live) or
    `topk_ids` + `topk_logp` (cached, already at temperature T); only the rows `keep` marks (all when None) count.

    Rows are weighed out rather than selected: a selection's size depends on the data, which would break a
    compiled graph in two. Chunks are split off by a fixed row count, so the graph keeps the count symbolic."""
    total = student_logits.new_zeros((), dtype=torch.float32)
    chunks = {key: value.split(ROWS_PER_CHUNK) for key, value in teacher.items()}
    kept = keep.split(ROWS_PER_CHUNK) if keep is not None else None
    for i, rows in enumerate(student_logits.split(ROWS_PER_CHUNK)):
        student = F.log_softmax(rows[:, :vocab].float() / cfg.temperature, dim=-1)
        if "logits" in teacher:
            target = F.log_softmax(chunks["logits"][i][:, :vocab].float() / cfg.temperature, dim=-1)
        else:
            student = with_rest(student.gather(-1, chunks["topk_ids"][i]))
            target = with_rest(chunks["topk_logp"][i].float())
        terms = divergence(student, target, cfg.loss, cfg.beta)
        total = total + (terms.sum() if kept is None else torch.where(kept[i], terms, 0.0).sum())
    return total


# --------------------------------------------------------------------------------------------------- the teacher
def check_teacher(cfg: DistillConfig, student_tokenizer: Any, student_name: str) -> Path:
    """The teacher's model directory, refused (one line) unless its tokenizer is the student's."""
    from llmkit.data.tokenizer import load_tokenizer
    from llmkit.runs import find_tokenizer_dir, resolve_model_dir

    assert cfg.teacher is not None
    teacher_dir = resolve_model_dir(cfg.teacher)
    check_same_tokenizer(load_tokenizer(find_tokenizer_dir(teacher_dir)), student_tokenizer, cfg.teacher, student_name)
    return teacher_dir


def load_teacher(cfg: RunConfig, device: Any) -> Any:
    """The teacher in the run's compute dtype on `device`, in eval mode, without gradients (LoRA merged)."""
    from llmkit.models import load_trained_model
    from llmkit.runs import resolve_model_dir

    assert cfg.distill.teacher is not None
    from llmkit.train.setup import compute_dtype

    teacher = load_trained_model(resolve_model_dir(cfg.distill.teacher), dtype=compute_dtype(cfg), merge=True)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher.to(device)


def check_same_tokenizer(teacher: Any, student: Any, teacher_name: str, student_name: str) -> None:
    """Distillation compares distributions token by token: both sides must mean the same thing by every id."""
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab == student_vocab:
        return
    if len(teacher_vocab) != len(student_vocab):
        detail = f"{len(teacher_vocab):,} tokens vs {len(student_vocab):,}"
        sides = (("student", student_vocab, teacher_vocab), ("teacher", teacher_vocab, student_vocab))
        for owner, more, fewer in sides:
            extra = sorted(set(more) - set(fewer), key=more.__getitem__)
            if extra:
                shown = ", ".join(repr(token) for token in extra[:4]) + (", ..." if len(extra) > 4 else "")
                detail += f"; the {owner} also has {shown}"
                if any(token.startswith("<|") for token in extra):
                    detail += " (a chat template's tokens: give both the same one, e.g. distill from a fine-tune)"
    else:
        differ = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()))[:1]
        detail = f"same size ({len(teacher_vocab):,}) but different ids, e.g. {differ[0][0]!r}"
    raise UserError(
        f"teacher {teacher_name} and student {student_name} have different vocabularies ({detail}); "
        "distillation needs one tokenizer: distill into a model built on the teacher's tokenizer"
    )


def teacher_logits(teacher: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from llmkit.train.step import model_inputs

    with torch.no_grad():
        return teacher(**model_inputs(batch)).logits


def teacher_side(teacher: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The teacher's rows, one per position of the batch: the cached top-k the batch carries, or live logits."""
    if "topk_ids" in batch:
        return {key: batch[key].reshape(-1, batch[key].shape[-1]) for key in ("topk_ids", "topk_logp")}
    live = teacher_logits(teacher, batch)
    return {"logits": live.reshape(-1, live.shape[-1])}


def distillation_loss(
    cfg: DistillConfig, vocab: int, teacher: Any = None
) -> Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    """The training loss (summed over target tokens, and their count) from the student's logits and a batch.

    The teacher's side comes from the batch when it carries the cached top-k (`topk_ids`, `topk_logp`), else from
    the live `teacher`."""
    scale = cfg.alpha * cfg.temperature**2

    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        targets = shifted_targets(batch["labels"])
        keep = targets != IGNORE
        count = keep.sum()
        student = logits.reshape(-1, logits.shape[-1])
        total = scale * token_divergence(student, teacher_side(teacher, batch), cfg, vocab, keep)
        if cfg.alpha < 1 and "on_policy" not in batch:  # the student's own samples are no data to imitate
            nll, _ = causal_lm_nll(logits, batch["labels"])
            total = total + (1 - cfg.alpha) * nll
        return total, count

    return loss_fn


def divergence_metric(cfg: DistillConfig, vocab: int, teacher: Any) -> Callable[..., Any]:
    """The validation divergence to the live teacher per target token (the loss's D, without the data term)."""

    def loss_fn(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        keep = shifted_targets(batch["labels"]) != IGNORE
        side = teacher_side(teacher, batch)
        return token_divergence(logits.reshape(-1, logits.shape[-1]), side, cfg, vocab, keep), keep.sum()

    return loss_fn


def evaluation(cfg: DistillConfig, vocab: int, teacher: Any) -> Callable[..., dict[str, Any]]:
    """Validation: the student's own loss and perplexity on the data (what bits per character come from), and
    its divergence from the teacher when the teacher is loaded."""
    from llmkit.train.job import evaluate_language_model, evaluate_loss

    data_loss = lambda logits, batch: causal_lm_nll(logits, batch["labels"])  # noqa: E731
    metric = divergence_metric(cfg, vocab, teacher) if teacher is not None else None

    def eval_fn(model: Any, batches: list[dict[str, torch.Tensor]], acc: Accelerator) -> dict[str, Any]:
        result = evaluate_language_model(model, batches, acc, data_loss)
        if metric is not None:
            result[f"val_{cfg.loss}"] = evaluate_loss(model, batches, acc, metric)
        return result

    return eval_fn


# ------------------------------------------------------------------------------------------------------ on-policy
class OnPolicy:
    """On-policy distillation (GKD): in a share `distill.on_policy` of the micro-batches, every row's answer is
    replaced by one the student samples itself (temperature 1, up to the data answer's length, stopping at the end
    of its turn) from the row's prompt, and the loss is the divergence to the live teacher on those tokens only.

    The prompt is everything before a row's first trained token (its first assistant turn; for text rows, the first
    token). The batch's answers are sampled together (prompts left-padded). Which micro-batches, and every sample,
    are drawn from (seed, step, micro-batch, process), so a resumed run draws the same ones. The new rows are packed
    like any others (llmkit.train.packing)."""

    def __init__(
        self,
        cfg: RunConfig,
        examples: list[Any],
        tokenizer: PreTrainedTokenizerBase,
        stop_ids: list[int],
        width: int,
        attn_implementation: str,
        accelerator: Accelerator,
    ) -> None:
        self.share, self.seed = cfg.distill.on_policy, cfg.train.seed
        self.examples, self.width, self.attn = examples, width, attn_implementation
        self.pad_id, self.stop_ids = int(tokenizer.pad_token_id), stop_ids
        self.accelerator = accelerator

    def __call__(self, model: Any, batch: dict[str, torch.Tensor], step: int, micro: int) -> dict[str, torch.Tensor]:
        import random

        from llmkit.train.packing import collate_rows, first_fit_decreasing

        seed = ((self.seed * 1_000_003 + step) * 1009 + micro) * 131 + self.accelerator.process_index
        if random.Random(seed).random() >= self.share:
            return batch
        student = self.accelerator.unwrap_model(model)
        was_training = student.training
        student.eval()
        indices = batch["sample_indices"].tolist()
        with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == "cuda" else []):
            torch.manual_seed(seed)
            samples = self._sample([self.examples[index] for index in indices], student)
        student.train(was_training)
        rows = first_fit_decreasing(np.asarray([len(e.ids) for e in samples]), self.width)
        new = collate_rows(
            [[samples[i] for i in row] for row in rows],
            self.pad_id,
            self.attn,
            [indices[i] for row in rows for i in row],
        )
        new["on_policy"] = torch.ones(())
        return new

    @torch.no_grad()
    def _sample(self, examples: list[Any], student: Any) -> list[Any]:
        """Every example's answer sampled in one batch: prompts left-padded, each answer cut to its own budget (the
        data answer's length) and at its first stop token."""
        from llmkit.data.templates import Encoded

        starts, budgets = [], []
        for example in examples:
            trained = np.flatnonzero(example.labels != IGNORE)
            starts.append(max(int(trained[0]) if len(trained) else 1, 1))
            budgets.append(max(len(example.ids) - starts[-1], 1))
        width = max(starts)
        prompts = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, (example, start) in enumerate(zip(examples, starts, strict=True)):
            prompts[row, width - start :] = torch.from_numpy(example.ids[:start])
            mask[row, width - start :] = 1
        device = self.accelerator.device
        out = student.generate(
            input_ids=prompts.to(device),
            attention_mask=mask.to(device),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=max(budgets),
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        samples = []
        for row, (example, start, budget) in enumerate(zip(examples, starts, budgets, strict=True)):
            answer = out[row, width : width + budget].cpu().numpy()
            answer = answer[: _through_stop(answer, self.stop_ids)]
            ids = np.concatenate([example.ids[:start], answer]).astype(np.int64)
            labels = np.concatenate([np.full(start, IGNORE), answer]).astype(np.int64)
            samples.append(Encoded(ids, labels, truncated=False))
        return samples


def _through_stop(answer: np.ndarray, stop_ids: list[int]) -> int:
    """Length of a sampled answer up to and including its first stop token (generate pads after it)."""
    for position, token in enumerate(answer.tolist()):
        if token in stop_ids:
            return position + 1
    return len(answer)


# ----------------------------------------------------------------------------------------------- the top-k cache
class TeacherCache:
    """The teacher's top-k log-probabilities (at temperature T) for every token of every training sample.

    A directory: `manifest.json` (what it was computed from), `offsets.npy` (where each sample's tokens start),
    `ids.npy` and `logp.npy` ([tokens, k]: uint16 or int32 token ids, float16 log-probabilities), memory-mapped.
    A sample is a pretraining block or an SFT example (its own positions, as it is encoded alone).
    """

    def __init__(self, root: Path) -> None:
        """Open the cache; a damaged one (files cut short, altered or missing) is one line naming it."""
        self.root = root
        try:
            self.manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
            self.offsets = np.load(root / "offsets.npy")
            self.ids = np.load(root / "ids.npy", mmap_mode="r")
            self.logp = np.load(root / "logp.npy", mmap_mode="r")
            tokens, k = int(self.manifest["tokens"]), int(self.manifest["key"]["k"])
            shapes = {
                "offsets.npy": (self.offsets.shape, (int(self.manifest["samples"]) + 1,)),
                "ids.npy": (self.ids.shape, (tokens, k)),
                "logp.npy": (self.logp.shape, (tokens, k)),
            }
            wrong = [f"{name} is {got}, not {want}" for name, (got, want) in shapes.items() if tuple(got) != want]
            if wrong or int(self.offsets[-1]) != tokens:
                raise ValueError("; ".join(wrong) or "its offsets do not end at its token count")
        except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
            raise UserError(
                f"{root}: damaged teacher cache ({str(exc)[:200]}); remove it, or point distill.cache "
                "at a new directory, and it is computed again"
            ) from None

    @property
    def k(self) -> int:
        return int(self.manifest["key"]["k"])

    def rows(self, rows: list[list[int]], width: int) -> dict[str, torch.Tensor]:
        """[len(rows), width, k] ids and log-probs for rows made of whole samples side by side (as collated)."""
        ids = np.zeros((len(rows), width, self.k), dtype=np.int64)
        logp = np.zeros((len(rows), width, self.k), dtype=np.float32)
        for r, samples in enumerate(rows):
            at = 0
            for sample in samples:
                start, end = int(self.offsets[sample]), int(self.offsets[sample + 1])
                ids[r, at : at + end - start] = self.ids[start:end]
                logp[r, at : at + end - start] = self.logp[start:end]
                at += end - start
        return {"topk_ids": torch.from_numpy(ids), "topk_logp": torch.from_numpy(logp)}


def cache_key(cfg: DistillConfig, data_fingerprint: str, vocab: int) -> dict[str, Any]:
    """What a cache was computed from; a cache whose key differs is not used (one line says why)."""
    from llmkit.runs import resolve_model_dir

    assert cfg.teacher is not None
    return {
        "version": CACHE_VERSION,
        "teacher": teacher_identity(resolve_model_dir(cfg.teacher)),
        "data": data_fingerprint,
        "k": min(cfg.top_k or 0, vocab),
        "temperature": cfg.temperature,
        "vocab": vocab,
    }


def saved_cache_key(root: Path) -> dict[str, Any] | None:
    manifest = root / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def check_given_cache(root: Path, key: dict[str, Any]) -> None:
    """A cache the user named (distill.cache) that holds another setting is refused, never replaced."""
    saved = saved_cache_key(root)
    if saved == key:
        TeacherCache(root)  # a damaged one is refused now, before the run directory is touched
    if saved is not None and saved != key:
        changed = ", ".join(name for name in key if saved.get(name) != key[name])
        raise UserError(
            f"{root}: a teacher cache for another setting ({changed} differ); point distill.cache at a new directory "
            "or remove this one"
        )
    if saved is None and root.exists() and any(root.iterdir()):
        raise UserError(f"{root}: not a teacher cache (no manifest.json) and not empty; choose another distill.cache")


def teacher_identity(model_dir: Path) -> str:
    """The teacher's config and weights: each weight file's size and the hash of its first and last 8 MiB (whole
    multi-GB files are not read for this)."""
    digest = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.json")) + sorted(Path(model_dir).glob("*.safetensors")):
        digest.update(path.name.encode())
        size = path.stat().st_size
        digest.update(str(size).encode())
        with path.open("rb") as handle:
            digest.update(handle.read(8 << 20))
            if size > 16 << 20:
                handle.seek(-(8 << 20), 2)
                digest.update(handle.read())
    return digest.hexdigest()


def cache_bytes(tokens: int, k: int, vocab: int) -> int:
    return tokens * k * ((2 if vocab <= 65536 else 4) + 2)


def open_or_build_cache(
    root: Path,
    key: dict[str, Any],
    lengths: list[int],
    batches: Callable[[list[int]], Iterator[dict[str, torch.Tensor]]],
    teacher: Callable[[], Any],
    accelerator: Accelerator,
    given: bool,
) -> TeacherCache:
    """The cache at `root` when its key matches; else (or when absent) one pass of the teacher over the samples,
    shared among the processes, written beside `root` and renamed into place. `given`: the user named `root`
    (distill.cache), so a mismatching one is refused rather than replaced."""
    saved = saved_cache_key(root)
    if saved == key:
        if accelerator.is_main_process:
            info(f"teacher cache: reusing {root} (top-{key['k']})")
        return TeacherCache(root)
    if given:
        check_given_cache(root, key)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    k, vocab = key["k"], key["vocab"]
    if accelerator.is_main_process:
        size = cache_bytes(int(offsets[-1]), k, vocab) / 2**20
        info(
            f"teacher cache: one pass of the teacher over {len(lengths):,} samples ({int(offsets[-1]):,} tokens), "
            f"top-{k} -> {root} ({size:,.1f} MiB)"
        )
    staging = root.parent / f".{root.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        np.save(staging / "offsets.npy", offsets)
        id_dtype = np.uint16 if vocab <= 65536 else np.int32
        np.lib.format.open_memmap(staging / "ids.npy", "w+", id_dtype, (int(offsets[-1]), k)).flush()
        np.lib.format.open_memmap(staging / "logp.npy", "w+", np.float16, (int(offsets[-1]), k)).flush()
    accelerator.wait_for_everyone()
    ids = np.load(staging / "ids.npy", mmap_mode="r+")
    logp = np.load(staging / "logp.npy", mmap_mode="r+")
    model = teacher()
    mine = list(range(accelerator.process_index, len(lengths), accelerator.num_processes))
    for batch in batches(mine):
        logits = teacher_logits(
            model, {key: value.to(accelerator.device) for key, value in batch.items() if key != "sample_indices"}
        )
        top = torch.topk(F.log_softmax(logits[..., :vocab].float() / key["temperature"], dim=-1), k, dim=-1)
        top_ids, top_logp = top.indices.cpu().numpy(), top.values.cpu().numpy()
        for row, sample in enumerate(batch["sample_indices"].tolist()):
            start, end = int(offsets[sample]), int(offsets[sample + 1])
            ids[start:end] = top_ids[row, : end - start]
            logp[start:end] = top_logp[row, : end - start]
    ids.flush()
    logp.flush()
    del ids, logp
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(staging / "manifest.json", {"key": key, "samples": len(lengths), "tokens": int(offsets[-1])})
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    accelerator.wait_for_everyone()
    return TeacherCache(root)


# ---------------------------------------------------------------------------------------------------- pretraining
class CachedBlocks:
    """A pretraining BlockLoader whose batches also carry the teacher's cached top-k for their blocks."""

    def __init__(self, loader: Any, cache: TeacherCache) -> None:
        self.loader, self.cache = loader, cache

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.loader.next_batch()
        rows = [[int(i)] for i in batch["sample_indices"]]
        return {**batch, **self.cache.rows(rows, batch["input_ids"].shape[1])}

    def __getattr__(self, name: str) -> Any:  # position, batches_per_epoch, ...
        return getattr(self.loader, name)


def pretrain_objective(
    cfg: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    loader: Any,
    dataset_fingerprint: str,
    accelerator: Accelerator,
    run_dir: Path,
) -> tuple[Objective, Any]:
    """`loss_fn` and `eval_fn` for `llmkit pretrain --teacher` (every token of a block is a target), and the loader
    to train from. With distill.top_k, the teacher's top-k over every training block is computed once (or reused)
    first, and the loader's batches carry it."""
    vocab = len(tokenizer)
    if not cfg.distill.top_k:
        teacher = load_teacher(cfg, accelerator.device)
        loss_fn = distillation_loss(cfg.distill, vocab, teacher=teacher)
        return Objective(loss_fn, eval_fn=evaluation(cfg.distill, vocab, teacher)), loader
    train_split = loader.dataset
    root = Path(cfg.distill.cache) if cfg.distill.cache else run_dir / "teacher_cache"
    key = cache_key(cfg.distill, dataset_fingerprint, vocab)
    micro, blocks = cfg.train.micro_batch_size, len(train_split)

    def batches(mine: list[int]) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, len(mine), micro):
            group = np.asarray(mine[start : start + micro])
            tokens = torch.from_numpy(train_split.blocks(group))
            yield {"input_ids": tokens, "sample_indices": torch.from_numpy(group)}

    cache = open_or_build_cache(
        root,
        key,
        [cfg.data.block_size] * blocks,
        batches,
        lambda: load_teacher(cfg, accelerator.device),
        accelerator,
        given=cfg.distill.cache is not None,
    )
    objective = Objective(distillation_loss(cfg.distill, vocab), eval_fn=evaluation(cfg.distill, vocab, None))
    return objective, CachedBlocks(loader, cache)
