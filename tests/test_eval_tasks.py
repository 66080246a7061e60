"""`llmkit eval` as a CI gate: task files, lm-evaluation-harness parity, reports, gates and regressions."""

from __future__ import annotations

import json
import random
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import assert_user_error, run_cli

RECIPES = Path(__file__).parent.parent / "recipes"


def write_story_choices(folder: Path, n: int = 24) -> Path:
    """Items from held-out stories: the true next words against the next words of other stories."""
    docs = [json.loads(line)["text"].split() for line in (RECIPES / "tasks" / "stories-sample.jsonl").open()]
    rng = random.Random(0)
    rows = []
    for doc in docs[:n]:
        cut = rng.randint(3, len(doc) - 4)
        others = [d for d in docs if d is not doc]
        wrong = [" ".join(d[cut : cut + 3]) or "the end" for d in rng.sample(others, 2)]
        choices = [" ".join(doc[cut : cut + 3]), *wrong]
        answer = rng.randrange(3)
        choices[0], choices[answer] = choices[answer], choices[0]
        rows.append({"question": " ".join(doc[:cut]), "choices": choices, "answer": answer})
    path = folder / "items.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_multiple_choice_scores_exactly_as_lm_evaluation_harness(tiny_run: Path, tmp_path: Path) -> None:
    """Same model, same items: identical acc and acc_norm in one report, and every log-likelihood within 1e-4."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llmkit.eval.tasks import LanguageModel

    items = write_story_choices(tmp_path)
    (tmp_path / "ours.yaml").write_text("name: ours\nkind: multiple_choice\ndata: items.jsonl\n")
    (tmp_path / "theirs.yaml").write_text(
        f"task: theirs\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {items}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    report_path = tmp_path / "report.json"
    result = run_cli("eval", tiny_run, "--tasks", tmp_path / "ours.yaml", "--harness", tmp_path / "theirs.yaml",
                     "--report", report_path)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads(report_path.read_text())
    ours, theirs = report["tasks"]["ours"], report["harness"]["theirs"]
    assert ours["items"] == 24
    assert ours["acc"] == theirs["acc"] and ours["acc_norm"] == theirs["acc_norm"]
    assert 0 < ours["acc"] < 1 or 0 < ours["acc_norm"] < 1  # not a degenerate agreement

    rows = [json.loads(line) for line in items.read_text().splitlines()]
    requests = [(row["question"], " " + choice) for row in rows for choice in row["choices"]]
    mine = LanguageModel(tiny_run / "final").loglikelihoods(requests, batch_size=7, label="ll")
    harness = HFLM(pretrained=str(tiny_run / "final"), batch_size=5, device="cpu")
    instances = [Instance("loglikelihood", {}, request, i) for i, request in enumerate(requests)]
    reference = [ll for ll, _ in harness.loglikelihood(instances)]
    assert mine == pytest.approx(reference, abs=1e-4)


def test_reports_gates_and_regressions(tiny_run: Path, tmp_path: Path) -> None:
    write_story_choices(tmp_path, n=12)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "tasks:\n  - {name: mc, kind: multiple_choice, data: items.jsonl}\n"
        f"  - include: {RECIPES / 'tasks' / 'stories-ppl.yaml'}\n"
        "gates:\n  - stories.perplexity<=100000\n"
    )
    out = {kind: tmp_path / f"eval.{kind}" for kind in ("json", "md", "xml")}
    args = ["eval", tiny_run, "--tasks", suite, "--report", out["json"], "--markdown", out["md"], "--junit", out["xml"]]
    passed = run_cli(*args, "--gate", "mc.acc>=0")
    assert passed.exit_code == 0, passed.stderr
    report = json.loads(out["json"].read_text())
    assert report["passed"] and set(report["metrics"]) == {
        "mc.acc", "mc.acc_norm", "stories.perplexity", "stories.bits_per_char"
    }  # fmt: skip
    suite_xml = ET.parse(out["xml"]).getroot().find("testsuite")
    assert suite_xml is not None and suite_xml.get("tests") == "2" and suite_xml.get("failures") == "0"
    assert "## llmkit eval: passed" in out["md"].read_text()

    # A baseline that was better on accuracy and perplexity: both regressions fail, with a table.
    better = dict(report)
    better["metrics"] = {**report["metrics"], "mc.acc": report["metrics"]["mc.acc"] + 0.5,
                         "stories.perplexity": report["metrics"]["stories.perplexity"] * 0.5}  # fmt: skip
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(better))
    regressed = run_cli(*args, "--baseline", baseline, "--max-regression", "0.01")
    assert regressed.exit_code == 1
    assert (
        "regression failed: mc.acc" in regressed.stderr and "regression failed: stories.perplexity" in regressed.stderr
    )
    assert "regression failed: mc.acc_norm" not in regressed.stderr  # unchanged metrics pass
    assert_user_error(run_cli(*args, "--max-regression", "0.01"), "--max-regression 0.01", "give --baseline")
    cases = ET.parse(out["xml"]).getroot().findall("testsuite/testcase")
    failed = sorted(case.get("name") for case in cases if case.find("failure") is not None)
    assert failed == ["regression mc.acc", "regression stories.perplexity"]
    markdown = out["md"].read_text()
    assert "FAILED (2 of" in markdown and "| regression mc.acc |" in markdown

    gate_failed = run_cli("eval", tiny_run, "--tasks", suite, "--gate", "mc.acc>1")
    assert gate_failed.exit_code == 1 and "gate failed: mc.acc" in gate_failed.stderr


def test_ci_eval_recipe_passes_on_a_model_that_learned_the_colors(tiny_run: Path, tmp_path: Path) -> None:
    from llmkit.data.corpus import color_chats

    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps(row) + "\n" for row in color_chats(600, seed=0)))
    trained = run_cli("finetune", "--model", tiny_run, "--data", chats, "--out", tmp_path / "chat",
                      "--max-steps", "600",
                      "--lr", "1e-2", "--micro-batch-size", "8", "--set", "finetune.max_length=64",
                      "--set", "schedule.warmup_steps=20", "--set", "logging.report_to=[]")  # fmt: skip
    assert trained.exit_code == 0, trained.stderr
    result = run_cli("eval", tmp_path / "chat", "--tasks", RECIPES / "ci-eval.yaml", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.stdout + result.stderr
    tasks = json.loads((tmp_path / "r.json").read_text())["tasks"]
    assert tasks["animal_colors_mc"]["acc"] >= 0.9 and tasks["animal_colors_gen"]["contains"] >= 0.8

    # Generation is batched with left padding: the answers are those of one prompt at a time.
    from llmkit.data.task_files import load_task_files, task_items
    from llmkit.eval.tasks import LanguageModel

    lm = LanguageModel(tmp_path / "chat" / "final")
    gen = load_task_files([RECIPES / "tasks" / "animal-colors-gen.yaml"])[0][0]
    prompts = [lm.render(gen, item, "x") + " " * (i % 3) for i, item in enumerate(task_items(gen))]  # mixed lengths
    assert lm.generate(prompts, 12, gen.stop) == [lm.generate([p], 12, gen.stop)[0] for p in prompts]

    untrained = run_cli("eval", tiny_run, "--tasks", RECIPES / "tasks" / "animal-colors-mc.yaml")
    assert_user_error(untrained, "chat: true but the model's tokenizer has no template")


def test_eval_bad_input(tiny_run: Path, tmp_path: Path) -> None:
    assert_user_error(run_cli("eval", tiny_run), "nothing to evaluate")
    task = tmp_path / "t.yaml"
    task.write_text("name: t\nkind: multiple_choice\ndata: items.jsonl\npromt: '{question}'\n")
    assert_user_error(run_cli("eval", tiny_run, "--tasks", task), "t.yaml: promt: Extra inputs are not permitted")
    task.write_text("name: t\nkind: multiple_choice\ndata: missing.jsonl\n")
    assert_user_error(run_cli("eval", tiny_run, "--tasks", task), "missing.jsonl: task t: data file not found")
    write_story_choices(tmp_path, n=3)
    task.write_text("name: t\nkind: multiple_choice\ndata: items.jsonl\n")
    assert_user_error(run_cli("eval", tiny_run, "--tasks", task, "--gate", "t.acc=>0.5"), "expected METRIC OP VALUE")
    assert_user_error(run_cli("eval", tiny_run, "--tasks", task, "--gate", "t.accc>=0.5"), "no metric 't.accc'")
    task.write_text("name: t\nkind: multiple_choice\ndata: items.jsonl\ngates: t.acc=>0.5\n")  # one rule, mistyped
    assert_user_error(run_cli("eval", tiny_run, "--tasks", task), f"{task}: gates: 't.acc=>0.5': expected METRIC OP")
    task.write_text("name: t\nkind: multiple_choice\ndata: items.jsonl\n")
    assert_user_error(
        run_cli("eval", tiny_run, "--tasks", task, "--baseline", tmp_path / "old.json"), "old.json: baseline report"
    )
    task.write_text("name: t\nkind: multiple_choice\nitems: [{question: q, choices: [a, b], answer: 5}]\n")
    assert_user_error(run_cli("eval", tiny_run, "--tasks", task), "item 1: 'answer' must be the index")


def test_harness_names_what_is_missing(tiny_run: Path) -> None:
    pytest.importorskip("lm_eval")
    assert_user_error(run_cli("eval", tiny_run, "--harness", "no_such_task"), "has no task no_such_task")
    offline = run_cli("eval", tiny_run, "--harness", "arc_easy", "--limit", "2")
    assert_user_error(offline, "the task data could not be loaded", "Hugging Face Hub")


def test_harness_not_installed_is_named(tiny_run: Path) -> None:
    """Without lm-evaluation-harness (hidden from the import system here), --harness says what to install."""
    import subprocess
    import sys

    hide = ("import importlib.util, sys; real = importlib.util.find_spec; "
            "importlib.util.find_spec = lambda name, *a: None if name == 'lm_eval' else real(name, *a); "
            "from llmkit.cli import main; "
            "sys.argv = ['llmkit', 'eval', sys.argv[1], '--harness', 'arc_easy']; main()")  # fmt: skip
    run = subprocess.run([sys.executable, "-c", hide, str(tiny_run)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines() == [
        "error: --harness needs lm-evaluation-harness, which is not installed: pip install 'llmkit[eval]'"
    ]


def test_a_bundled_task_file_loads_by_name_with_its_includes_and_data() -> None:
    from llmkit.data.task_files import load_task_files, task_items

    by_name, gates = load_task_files([Path("ci-eval")])
    by_path, path_gates = load_task_files([RECIPES / "ci-eval.yaml"])
    assert [t.name for t in by_name] == [t.name for t in by_path] and gates == path_gates and by_name
    assert all(Path(t.base).resolve() == Path(p.base).resolve() for t, p in zip(by_name, by_path, strict=True))
    assert all(task_items(task) for task in by_name)  # data files found beside the bundled task files


def test_generation_answers_are_checked_as_the_task_file_says() -> None:
    """The check `llmkit eval` scores generation tasks with, and GRPO's task-file rewards reuse."""
    from types import SimpleNamespace

    from llmkit.errors import UserError
    from llmkit.scoring import answer_score

    def check(how: str, output: str, target: str, tolerance: float = 0.0) -> float:
        return answer_score(output, target, SimpleNamespace(match=how, tolerance=tolerance), "tasks.yaml: item 1")

    assert check("exact", " 7 ", "7") == 1.0 and check("exact", "7.", "7") == 0.0
    assert check("contains", "The fox is Yellow.", "yellow") == 1.0
    assert check("regex", "answer: 42", r"\b42\b") == 1.0 and check("regex", "421", r"\b42\b") == 0.0
    assert check("numeric", "It is 1,234.0 apples", "1234") == 1.0
    assert check("numeric", "about 3.14", "3.1416", tolerance=0.01) == 1.0
    assert check("numeric", "about 3.2", "3.1416", tolerance=0.01) == 0.0
    assert check("numeric", "no number here", "3") == 0.0
    with pytest.raises(UserError, match="item 1: answer 'seven' is not a number"):
        check("numeric", "7", "seven")
