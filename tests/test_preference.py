"""Preference tuning (--task dpo/orpo/simpo): TRL's losses on the same model and batch, packing of pairs, the
rows refused with file:line, a learning check on pairs whose answer is known, and exact resume."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from llmkit.config import PreferenceConfig
from llmkit.data.corpus import story_preference_pairs
from llmkit.data.formats import Example
from llmkit.data.pairs import Pair, _split_shared_prefix
from llmkit.data.templates import Encoded
from llmkit.data.tokenizer import train_bpe
from llmkit.losses import IGNORE
from llmkit.train.tasks.preference import REFERENCE_FILE, collate_pairs, pair_scores, sequence_logps
from tests.conftest import assert_user_error, run_cli

ROWS = list(story_preference_pairs(8, 1))


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([r["prompt"] + r["chosen"] for r in story_preference_pairs(200, 2)], 300)


def tiny_llama(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return LlamaForCausalLM(config)


def encoded(prompt: list[int], answer: list[int]) -> Encoded:
    ids = np.asarray(prompt + answer, dtype=np.int64)
    return Encoded(ids, np.where(np.arange(len(ids)) >= len(prompt), ids, IGNORE), False)


def logits_of(model, batch) -> torch.Tensor:
    return model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits


def with_reference(pairs: list[Pair], reference_model, pad_id: int) -> dict:
    with torch.no_grad():
        batch = collate_pairs([[p] for p in pairs], pad_id, "sdpa")
        sums, _ = sequence_logps(logits_of(reference_model, batch), batch)
    for pair, (chosen, rejected) in zip(pairs, sums.view(-1, 2).tolist(), strict=True):
        pair.reference = (chosen, rejected)
    return collate_pairs([[p] for p in pairs], pad_id, "sdpa")


@pytest.fixture(scope="module")
def trl_dpo(tokenizer, tmp_path_factory: pytest.TempPathFactory):
    """TRL's DPOTrainer on a tiny Llama with a reference model that differs from the policy, and the same pairs
    as llmkit sees them (TRL's own token ids)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), per_device_train_batch_size=8, report_to=[],
                     use_cpu=True, beta=0.5, max_length=None)  # fmt: skip
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(ROWS),
                         processing_class=tokenizer)  # fmt: skip
    rows = [trainer.train_dataset[i] for i in range(len(ROWS))]
    pairs = [Pair(encoded(r["prompt_ids"], r["chosen_ids"]), encoded(r["prompt_ids"], r["rejected_ids"]), f"{i}")
             for i, r in enumerate(rows)]  # fmt: skip
    return trainer, trainer.data_collator(rows), pairs, policy, reference


@pytest.mark.parametrize(("loss", "smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_dpo_losses_equal_trls_on_the_same_model_and_batch(trl_dpo, tokenizer, loss: str, smoothing: float) -> None:
    trainer, trl_batch, pairs, policy, reference = trl_dpo
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss], [1.0], smoothing
    theirs = float(trainer.compute_loss(policy, dict(trl_batch)).detach())
    batch = with_reference(pairs, reference, tokenizer.pad_token_id)
    settings = PreferenceConfig(beta=0.5, loss=loss, label_smoothing=smoothing)
    scores, total = pair_scores("dpo", logits_of(policy, batch), batch, settings)
    ours = float(total.detach()) / len(pairs)
    assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)), (ours, theirs)
    assert not torch.allclose(scores.chosen_rewards, scores.rejected_rewards)  # the policy is not the reference


def test_simpo_and_orpo_equal_trls_on_the_same_model_and_batch(trl_dpo, tokenizer) -> None:
    """TRL's CPO (SimPO) and ORPO losses given TRL's own mean log-probs of the same padded batch."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    _, _, pairs, policy, _ = trl_dpo
    batch = collate_pairs([[p] for p in pairs], tokenizer.pad_token_id, "sdpa")
    logits = logits_of(policy, batch)
    # TRL's log-probs: one padded row per sequence, chosen rows first
    width = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], labels[i, : len(row)], mask[i, : len(row)] = (torch.from_numpy(row.ids),
                                                                          torch.from_numpy(row.labels), 1)  # fmt: skip
    padded_logits = policy(input_ids=ids, attention_mask=mask).logits
    means = CPOTrainer.get_batch_logps(padded_logits, labels, average_log_prob=True)
    chosen_mean, rejected_mean = means[: len(pairs)], means[len(pairs) :]
    device = SimpleNamespace(device=torch.device("cpu"))

    simpo = PreferenceConfig(beta=2.0, simpo_gamma=0.5, label_smoothing=0.1)
    cpo_self = SimpleNamespace(alpha=0.0, beta=2.0, label_smoothing=0.1, simpo_gamma=0.5, loss_type="simpo",
                               accelerator=device)  # fmt: skip
    theirs, _, _ = CPOTrainer.cpo_loss(cpo_self, chosen_mean, rejected_mean)
    scores, total = pair_scores("simpo", logits, batch, simpo)
    torch.testing.assert_close(scores.losses, theirs, rtol=1e-5, atol=1e-6)

    orpo = PreferenceConfig(beta=0.2)
    odds, _, _, _, _ = ORPOTrainer.odds_ratio_loss(SimpleNamespace(beta=0.2, accelerator=device), chosen_mean,
                                                    rejected_mean)  # fmt: skip
    scores, total = pair_scores("orpo", logits, batch, orpo)
    torch.testing.assert_close(scores.losses, -odds, rtol=1e-5, atol=1e-6)
    # ORPO's SFT term: the chosen answers' mean NLL (TRL's experimental trainer also counts the prompt's tokens)
    nll = torch.nn.functional.cross_entropy(padded_logits[: len(pairs), :-1].flatten(0, 1),
                                            labels[: len(pairs), 1:].flatten(), ignore_index=IGNORE)  # fmt: skip
    torch.testing.assert_close(total / len(pairs), (-odds).mean() + nll, rtol=1e-5, atol=1e-6)


def test_kto_loss_equals_trls_on_the_same_model_and_batch(tokenizer, tmp_path: Path) -> None:
    """TRL's KTOTrainer builds each row's mismatched (KL) sequence by rotating completions within the batch; llmkit
    carries it beside the row's own sequence and estimates the KL term from the batch the same way."""
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    rows = [{"prompt": r["prompt"], "completion": r["chosen"] if i % 3 else r["rejected"], "label": bool(i % 3)}
            for i, r in enumerate(ROWS)]  # fmt: skip
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True, beta=0.5,
                     max_length=None, desirable_weight=1.0, undesirable_weight=1.5)  # fmt: skip
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer)  # fmt: skip
    tokenized = [trainer.train_dataset[i] for i in range(len(rows))]
    theirs = float(trainer.compute_loss(policy, dict(trainer.data_collator(tokenized))).detach())
    pairs = [Pair(encoded(r["prompt_ids"], r["completion_ids"]), encoded(r["prompt_ids"], r["KL_completion_ids"]),
                  f"{i}", desirable=r["label"]) for i, r in enumerate(tokenized)]  # fmt: skip
    batch = with_reference(pairs, reference, tokenizer.pad_token_id)
    settings = PreferenceConfig(beta=0.5, desirable_weight=1.0, undesirable_weight=1.5)
    _, total = pair_scores("kto", logits_of(policy, batch), batch, settings)
    ours = float(total.detach()) / len(pairs)
    assert abs(ours - theirs) <= 1e-5 * max(1.0, abs(theirs)), (ours, theirs)


def test_packed_pairs_give_the_loss_and_gradients_of_pairs_one_by_one(tokenizer) -> None:
    model, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    pairs = []
    for row in ROWS[:5]:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        chosen, rejected = (tokenizer(row[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                            for k in ("chosen", "rejected"))  # fmt: skip
        pairs.append(Pair(encoded(prompt, chosen), encoded(prompt, rejected), "x"))
    with_reference(pairs, reference, tokenizer.pad_token_id)
    settings = PreferenceConfig(beta=0.3)
    results = []
    for rows in ([[p] for p in pairs], [pairs[:3], pairs[3:]]):  # one pair per row; then 3 and 2 pairs per row
        model.zero_grad()
        batch = collate_pairs(rows, tokenizer.pad_token_id, "sdpa")
        _, total = pair_scores("dpo", logits_of(model, batch), batch, settings)
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in model.parameters()]))
    (single, single_grads), (packed, packed_grads) = results
    torch.testing.assert_close(packed, single, rtol=1e-5, atol=1e-6)
    for a, b in zip(packed_grads, single_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_whole_conversations_give_their_shared_beginning_as_the_prompt() -> None:
    text = {"chosen": "\n\nHuman: What is red?\n\nAssistant: A fire truck is red.",
            "rejected": "\n\nHuman: What is red?\n\nAssistant: A banana."}  # fmt: skip
    prompt, chosen, rejected = _split_shared_prefix(text, "x:1")
    assert prompt == "\n\nHuman: What is red?\n\nAssistant: A" and chosen == " fire truck is red."
    assert rejected == " banana."  # cut between words, never inside one
    user = {"role": "user", "content": "Hi"}
    turns = {"chosen": [user, {"role": "assistant", "content": "Hello!"}],
             "rejected": [user, {"role": "assistant", "content": "Go away."}]}  # fmt: skip
    prompt, chosen, rejected = _split_shared_prefix(turns, "x:1")
    assert prompt == (user,) and chosen == ({"role": "assistant", "content": "Hello!"},)


BAD_ROWS = [
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}, "are identical, so there is nothing to prefer"),
    ({"prompt": "Hi", "chosen": "  ", "rejected": "Hello."}, "'chosen' is empty"),
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": 3}, "field 'rejected' is int, expected text"),
    ({"prompt": "Hi " * 80, "chosen": "Hello.", "rejected": "Bye."}, "leaving none of the 'chosen' answer"),
    ({"chosen": "Yes it is.", "rejected": "No."}, "share no beginning, so there is no prompt"),
    ({"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "share no first turn"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
      "rejected": [{"role": "user", "content": "a"}, {"role": "user", "content": "c"}]},
     "continues with a user turn"),
    ({"prompt": "Hi", "completion": "Hello.", "label": "yes"}, "KTO labels are true (desirable) or false"),
    ({"prompt": "Hi", "completion": "", "label": True}, "'completion' is empty"),
]  # fmt: skip


@pytest.mark.parametrize(("row", "fragment"), BAD_ROWS)
def test_a_pair_that_cannot_be_used_is_one_line_naming_its_row(row: dict, fragment: str, tiny_run: Path,
                                                               tmp_path: Path) -> None:  # fmt: skip
    data = tmp_path / "pairs.jsonl"
    good = {"prompt": "The cat sat.", "chosen": " The dog ran.", "rejected": " ran dog The."}
    whole = {"chosen": "The cat sat. The dog ran.", "rejected": "The cat sat. ran dog The."}
    unpaired = {"prompt": "The cat sat.", "completion": " The dog ran.", "label": True}
    first, task = (unpaired, "kto") if "label" in row else (good if "prompt" in row else whole, "dpo")
    data.write_text(json.dumps(first) + "\n" + json.dumps(row) + "\n")
    result = run_cli("finetune", "--task", task, "--model", tiny_run, "--data", data, "--out", tmp_path / "run",
                     "--max-length", "64")  # fmt: skip
    assert_user_error(result, f"{data}:2", fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_kto_teaches_a_model_from_single_labelled_answers(random_base: Path, tmp_path: Path) -> None:
    """Grammatical answers labelled true, shuffled ones false, one answer per row: on held-out rows the desirable
    answers gain more reward than the undesirable ones, and the multiple-choice task on other pairs goes from about
    0.5 to at least 0.9."""
    rows = []
    for i, row in enumerate(story_preference_pairs(1000, 0)):
        good = i % 2 == 0
        rows.append({"prompt": row["prompt"], "completion": row["chosen"] if good else row["rejected"], "label": good})
    data = tmp_path / "unpaired.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    run = tmp_path / "kto"
    result = run_cli("finetune", "--task", "kto", "--method", "lora", "--model", random_base, "--data", data,
                     "--out", run, "--max-steps", "120", "--micro-batch-size", "16", "--max-length", "64",
                     "--lr", "5e-3", "--set", "train.eval_every=60", "--set", "logging.every_steps=20")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "format unpaired" in result.stdout and (run / REFERENCE_FILE).exists()
    last = json.loads((run / "summary.json").read_text())["evaluation"]
    assert last["val_rewards/margin"] > 0.1 and last["val_rewards/chosen"] > last["val_rewards/rejected"]
    after = run_cli("eval", run, "--tasks", grammar_task(tmp_path), "--report", tmp_path / "after.json")
    assert after.exit_code == 0, after.stderr
    assert json.loads((tmp_path / "after.json").read_text())["tasks"]["grammar"]["acc"] >= 0.9


def test_an_unknown_task_is_one_line(tiny_run: Path, tmp_path: Path) -> None:
    result = run_cli("finetune", "--task", "ppo", "--model", tiny_run, "--data", tmp_path / "x.jsonl")
    assert_user_error(result, "finetune.task", "dpo")


def write_pairs(path: Path, n: int, seed: int) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in story_preference_pairs(n, seed)))
    return path


@pytest.fixture(scope="module")
def random_base(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: Path) -> Path:
    """A model that has learnt nothing yet: one step at a negligible learning rate from its initialization."""
    out = tmp_path_factory.mktemp("pref") / "random"
    result = run_cli("pretrain", "--data", tiny_dataset, "--out", out, "--max-steps", "1", "--lr", "1e-12",
                     "--micro-batch-size", "8", "--set", "model.n_layers=2", "--set", "model.hidden_size=32",
                     "--set", "model.n_heads=4", "--set", "model.n_kv_heads=2", "--set", "model.context_length=64",
                     "--set", "schedule.warmup_steps=0")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


def grammar_task(tmp_path: Path) -> Path:
    """A multiple-choice task on held-out pairs: the grammatical sentence or its shuffled words, in random order."""
    rng = random.Random(0)
    items = []
    for row in story_preference_pairs(200, 99):
        answer = rng.randrange(2)
        choices = [row["chosen"], row["rejected"]] if answer == 0 else [row["rejected"], row["chosen"]]
        items.append({"prompt": row["prompt"], "choices": choices, "answer": answer})
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    task = tmp_path / "grammar.yaml"
    task.write_text('name: grammar\nkind: multiple_choice\ndata: items.jsonl\nprompt: "{prompt}"\n'
                    'target_delimiter: ""\n')  # fmt: skip
    return task


@pytest.mark.slow
def test_dpo_teaches_a_model_to_prefer_grammatical_answers(random_base: Path, tmp_path: Path) -> None:
    """Known answer: the chosen sentence follows the story grammar, the rejected one is its words shuffled. The
    untrained model cannot tell them apart (about 0.5); DPO with LoRA must reach 0.9 held-out reward accuracy, and
    an `llmkit eval` multiple-choice task on other pairs must agree."""
    task = grammar_task(tmp_path)
    before = run_cli("eval", random_base, "--tasks", task, "--report", tmp_path / "before.json")
    assert before.exit_code == 0, before.stderr
    accuracy_before = json.loads((tmp_path / "before.json").read_text())["tasks"]["grammar"]["acc"]
    assert 0.3 < accuracy_before < 0.7

    run = tmp_path / "dpo"
    result = run_cli("finetune", "--task", "dpo", "--method", "lora", "--model", random_base, "--data",
                     write_pairs(tmp_path / "pairs.jsonl", 1000, 0), "--out", run, "--max-steps", "120",
                     "--micro-batch-size", "16", "--max-length", "64", "--lr", "5e-3", "--set", "train.eval_every=40",
                     "--set", "logging.every_steps=20")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    evaluations = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert {"val_rewards/chosen", "val_rewards/rejected", "val_rewards/accuracy", "val_rewards/margin",
            "val_logps/chosen", "val_logps/rejected"} <= evaluations[-1].keys()  # fmt: skip
    assert evaluations[-1]["val_rewards/accuracy"] >= 0.9 and evaluations[-1]["val_rewards/margin"] > 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["evaluation"]["val_rewards/accuracy"] == evaluations[-1]["val_rewards/accuracy"]
    assert "val rewards" in result.stdout

    after = run_cli("eval", run, "--tasks", task, "--report", tmp_path / "after.json")
    assert after.exit_code == 0, after.stderr
    assert json.loads((tmp_path / "after.json").read_text())["tasks"]["grammar"]["acc"] >= 0.9


@pytest.mark.slow
def test_a_killed_dpo_run_resumes_bitwise_with_its_reference_log_probs(random_base: Path, tmp_path: Path) -> None:
    from tests.test_resume import llmkit_subprocess

    data = write_pairs(tmp_path / "pairs.jsonl", 200, 3)

    def args(out: Path) -> list[str | Path]:
        return ["finetune", "--task", "dpo", "--method", "lora", "--model", random_base, "--data", data, "--out",
                out, "--max-steps", "12", "--micro-batch-size", "8", "--max-length", "64", "--lr", "3e-3",
                "--set", "train.grad_accum_steps=2", "--set", "checkpoint.every_steps=4",
                "--set", "train.eval_every=6", "--set", "logging.report_to=[]"]  # fmt: skip

    reference = run_cli(*args(tmp_path / "reference"))
    assert reference.exit_code == 0, reference.stderr
    run = tmp_path / "run"
    proc = llmkit_subprocess(*args(run), env={"LLMKIT_FAULT_INJECT": "kill@10.1"})
    proc.wait(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    cache = run / REFERENCE_FILE
    written = (cache.stat().st_mtime_ns, cache.read_bytes())
    resumed = run_cli(*args(run), "--resume", "auto")
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    assert (cache.stat().st_mtime_ns, cache.read_bytes()) == written  # read, not computed again
    assert cache.read_bytes() == (tmp_path / "reference" / REFERENCE_FILE).read_bytes()
    final, expected = (load_file(run / "final" / "adapter_model.safetensors"),
                       load_file(tmp_path / "reference" / "final" / "adapter_model.safetensors"))  # fmt: skip
    assert final.keys() == expected.keys() and all(torch.equal(final[k], expected[k]) for k in final)


def test_pair_rows_keep_their_format_fields() -> None:
    """A message-list prompt with string answers becomes a chat: the answers are assistant turns."""
    from llmkit.data.pairs import _answer_row

    example = Example("x:1", messages=({"role": "user", "content": "Hi"},), extra={"chosen": "a", "rejected": "b"})
    row = _answer_row(example, "a")
    assert row.messages == ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"})
    plain = _answer_row(Example("x:1", prompt="Hi"), "a")
    assert plain.prompt == "Hi" and plain.completion == "a" and not plain.messages


@pytest.mark.slow
def test_a_reward_model_learns_the_pairs_and_eval_scores_pairs_and_candidates(random_base: Path,
                                                                              tmp_path: Path) -> None:  # fmt: skip
    run = tmp_path / "reward"
    result = run_cli("finetune", "--task", "reward", "--model", random_base, "--data",
                     write_pairs(tmp_path / "pairs.jsonl", 1000, 0), "--out", run, "--max-steps", "60",
                     "--micro-batch-size", "16", "--max-length", "64", "--lr", "3e-3", "--set", "train.eval_every=30",
                     "--set", "logging.every_steps=20")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "val rewards" in result.stdout

    held_out = write_pairs(tmp_path / "held_out.jsonl", 100, 77)
    gated = run_cli("eval", run, "--data", held_out, "--min-accuracy", "0.9", "--report", tmp_path / "r.json")
    assert gated.exit_code == 0, gated.stdout + gated.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kind"] == "reward" and report["pairs"] == 100 and report["margin"] > 0

    candidates = tmp_path / "candidates.jsonl"
    rows = list(story_preference_pairs(20, 78))
    candidates.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r[k]}) + "\n"
                                  for r in rows for k in ("chosen", "rejected")))  # fmt: skip
    scored = run_cli("eval", run, "--task", "reward", "--data", candidates, "--scores", tmp_path / "scores.jsonl")
    assert scored.exit_code == 0, scored.stderr
    rewards = [json.loads(line)["reward"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert len(rewards) == 40
    assert sum(rewards[0::2]) > sum(rewards[1::2])  # the grammatical candidates score higher


def test_reward_evaluation_of_a_model_that_is_not_a_reward_model_is_one_line(tiny_run: Path, tmp_path: Path) -> None:
    data = write_pairs(tmp_path / "pairs.jsonl", 4, 0)
    assert_user_error(run_cli("eval", tiny_run, "--task", "reward", "--data", data), "not a reward model")
    assert_user_error(run_cli("eval", tiny_run, "--data", data, "--scores", tmp_path / "s.jsonl"),
                      "only a reward model scores candidates")  # fmt: skip
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.slow
def test_dpo_on_two_processes_at_batch_b_matches_one_process_at_2b(random_base: Path, tmp_path: Path) -> None:
    """DDP over gloo: each process computes the same reference log-probs, takes its share of every global batch of
    pairs, and the loss is normalized by the pairs of the whole step: losses within 1e-5, adapters within 1e-5."""
    import os
    import subprocess
    import sys

    data = write_pairs(tmp_path / "pairs.jsonl", 160, 5)  # no LoRA dropout: its draws differ per process
    common = ["finetune", "--task", "dpo", "--method", "lora", "--model", str(random_base), "--data", str(data),
              "--max-steps", "4", "--max-length", "64", "--lr", "3e-3", "--set", "logging.every_steps=1",
              "--set", "train.eval_every=1000", "--set", "logging.report_to=[]",
              "--set", "finetune.lora.dropout=0"]  # fmt: skip
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "llmkit", *common, "--out", str(tmp_path / "two"),
                          "--micro-batch-size", "2", "--cpu", "--num-processes", "2", "--main-process-port", "29538"],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    one = run_cli(*common, "--out", tmp_path / "one", "--micro-batch-size", "4")
    assert one.exit_code == 0, one.stderr

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    # the same reference log-probs: to the bit where the CPU's kernels do not depend on the batch's size, and
    # within float32's rounding where they do (AVX512 CPUs pick kernels by shape)
    np.testing.assert_allclose(*(np.load(tmp_path / run / REFERENCE_FILE) for run in ("two", "one")), rtol=1e-6)
    a, b = (load_file(tmp_path / name / "final" / "adapter_model.safetensors") for name in ("two", "one"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_answers_identical_once_cut_to_max_length_are_refused(tokenizer) -> None:
    from llmkit.data.pairs import encode_pair
    from llmkit.errors import UserError

    prompt = "The cat sat on the mat."
    row = Example("pairs.jsonl:3", prompt=prompt, extra={"chosen": " The dog ran far.", "rejected": " The dog sat."})
    cut = len(tokenizer(prompt + " The dog", add_special_tokens=False)["input_ids"])
    assert encode_pair(tokenizer, row, 64).chosen.trainable > 0
    with pytest.raises(UserError, match=r"pairs.jsonl:3: 'chosen' and 'rejected' are identical within finetune"):
        encode_pair(tokenizer, row, cut)


def test_kto_rows_of_one_label_are_refused(tiny_run: Path, tmp_path: Path) -> None:
    data = tmp_path / "good.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Hi", "completion": f" Hello {i}.", "label": True}) + "\n"
                            for i in range(8)))  # fmt: skip
    result = run_cli("finetune", "--task", "kto", "--model", tiny_run, "--data", data, "--out", tmp_path / "run")
    assert_user_error(result, "every training row is desirable; KTO needs rows labelled true and false")
