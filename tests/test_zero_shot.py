"""Zero-shot accuracy through lm-eval: offline tasks built from WikiText-2 test by their rules, ``evaluate --tasks``
returning exactly lm-eval's own ``simple_evaluate``, SmolLM2 above chance dense and pruned, prune.py / train.py
``--eval_tasks`` and ``compare``, and bad input refused in one line with nothing left behind."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest
from test_finetune import pruned_checkpoint  # noqa: F401 - the tiny Llama pruned unevenly, a gp_pruned checkpoint

from gp_lightning.cli import main, prune_main, train_main
from gp_lightning.evaluation.offline_tasks import CHOICE, CLOZE, build_tasks
from gp_lightning.evaluation.zero_shot import evaluate_tasks
from gp_lightning.model.source import load_model


@pytest.fixture(scope="module")
def offline_tasks(tmp_path_factory: pytest.TempPathFactory, wikitext: Path) -> Path:
    """``gp-lightning build-tasks`` on the shared WikiText-2 test file."""
    out = tmp_path_factory.mktemp("tasks") / "wikitext"
    assert main(["build-tasks", "--text", str(wikitext / "test.txt"), "--output", str(out)]) == 0
    return out


def _items(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_the_offline_tasks_follow_their_rules(offline_tasks: Path, wikitext: Path, tmp_path: Path) -> None:
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    lines = (wikitext / "test.txt").read_text(encoding="utf-8").splitlines()
    manifest = json.loads((offline_tasks / "tasks.json").read_text())
    cloze, choice = _items(offline_tasks / f"{CLOZE}.jsonl"), _items(offline_tasks / f"{CHOICE}.jsonl")
    assert manifest["items"] == {CLOZE: len(cloze), CHOICE: len(choice)} and min(len(cloze), len(choice)) > 200

    def paragraph(item: dict) -> str:
        raw = lines[int(item["id"].removeprefix("line-")) - 1].strip()
        assert raw.split().count("<unk>") <= 0.05 * len(raw.split()) and not raw.startswith("=")
        text = wikitext_detokenizer({"page": f" {raw} "}).strip()
        assert len(text.split()) >= 40
        return text

    for item in cloze:
        assert re.fullmatch(r"[A-Za-z]{4,}", item["target"]) and 15 <= len(item["context"].split()) <= 40
        assert paragraph(item).endswith(f"{item['context']} {item['target']}.")
    headings = [i for i, line in enumerate(lines, start=1) if re.fullmatch(r"= [^=].* =", line.strip())]
    article = {item["choices"][item["gold"]]: sum(h < int(item["id"][5:]) for h in headings) for item in choice}
    for item in choice:
        text, true = paragraph(item), item["choices"][item["gold"]]
        assert text.endswith(f"{item['context']} {true}") and 5 <= len(true.split()) <= 40 and "<unk>" not in true
        assert len(set(item["choices"])) == 4 and set(item["choices"]) <= set(article)
        assert sum(article[ending] == article[true] for ending in item["choices"]) == 1  # the others: other articles
    assert len({item["gold"] for item in choice}) == 4  # the true ending is not always in one place
    # deterministic: the same file and seed give the same bytes; another seed another order; --max_items cuts
    again = build_tasks(wikitext / "test.txt", tmp_path / "again")
    assert (tmp_path / "again" / f"{CHOICE}.jsonl").read_bytes() == (offline_tasks / f"{CHOICE}.jsonl").read_bytes()
    assert again["items"] == manifest["items"]
    build_tasks(wikitext / "test.txt", tmp_path / "seed1", seed=1, max_items=10)
    other = _items(tmp_path / "seed1" / f"{CLOZE}.jsonl")
    assert len(other) == 10 and [i["id"] for i in other] != [i["id"] for i in cloze[:10]]


def test_evaluate_returns_what_lm_eval_returns(offline_tasks: Path, pruned_checkpoint: Path, tmp_path: Path,  # noqa: F811
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``gp-lightning evaluate <pruned checkpoint> --tasks <folder>``: lm-eval's numbers for the same model object."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = tmp_path / "zs"
    assert main(["evaluate", str(pruned_checkpoint), "--tasks", str(offline_tasks), "--limit", "12", "--output",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"| model | {CHOICE} (acc) | {CLOZE} (acc) | average |" in printed
    ours = json.loads((out / "zero_shot.json").read_text())["checkpoints"][0]
    model, tokenizer = load_model(str(pruned_checkpoint))
    assert type(model).__name__ == "GPPrunedForCausalLM"
    yamls = [str(offline_tasks / f"{name}.yaml") for name in (CHOICE, CLOZE)]
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=8), tasks=yamls,
                                     limit=12, task_manager=TaskManager(include_defaults=False))
    assert ours["lm_eval"]["results"] == theirs["results"]
    choice, cloze = theirs["results"][CHOICE], theirs["results"][CLOZE]
    assert ours["tasks"][CHOICE]["metrics"]["acc_norm"] == {"value": choice["acc_norm,none"],
                                                           "stderr": choice["acc_norm_stderr,none"]}
    assert ours["tasks"][CLOZE]["value"] == cloze["acc,none"] and ours["tasks"][CLOZE]["items"] == 12
    assert ours["average"] == pytest.approx((choice["acc,none"] + cloze["acc,none"]) / 2)
    assert "| **average** |" in (out / "zero_shot.md").read_text()


def test_smollm2_is_above_chance_dense_and_pruned(offline_tasks: Path, smollm2_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Chance: 25% on the four choices, about 0 on the cloze (the exact word, greedily). 12 items a task dense, 8
    pruned (evaluated, not judged: a 20% magnitude pruning without recovery loses most of it)."""
    start = time.perf_counter()
    model, tokenizer = load_model(str(smollm2_dir))
    dense = evaluate_tasks(model, tokenizer, str(offline_tasks), limit=12)  # the API a benchmark calls
    del model
    assert dense["tasks"][CHOICE]["items"] == dense["tasks"][CLOZE]["items"] == 12
    assert dense["tasks"][CHOICE]["value"] >= 0.5 and dense["tasks"][CLOZE]["value"] >= 0.15, dense["tasks"]
    dense_s = time.perf_counter() - start

    run = tmp_path / "pruned"
    assert prune_main(["--model", str(smollm2_dir), "--pruning_ratio", "0.2", "--importance_method", "magnitude",
                       "--compensation", "none", "--test_before_prune", "false", "--test_after_prune", "false",
                       "--save_model", "false", "--eval_tasks", str(offline_tasks), "--eval_limit", "8",
                       "--precision", "32-true", "--eval_precision", "32-true", "--output", str(run)]) == 0
    pruned = json.loads((run / "evaluation" / "zero_shot.json").read_text())
    results = json.loads((run / "evaluation_results.json").read_text())
    assert results["zero_shot"] == {CHOICE: pruned["tasks"][CHOICE]["value"], CLOZE: pruned["tasks"][CLOZE]["value"],
                                    "average": pruned["average"]}
    assert pruned["tasks"][CHOICE]["items"] == 8 and 0 <= pruned["average"] <= 1
    assert "evaluation/zero_shot.json" in json.loads((run / "run.json").read_text())["files"]  # --overwrite removes it
    with capsys.disabled():
        print(f"\nSmolLM2: dense (12 items a task) {CHOICE} {dense['tasks'][CHOICE]['value']:.3f} {CLOZE} "
              f"{dense['tasks'][CLOZE]['value']:.3f} ({dense_s:.1f} s); 20% pruned (magnitude, 8 items) "
              f"{pruned['tasks'][CHOICE]['value']:.3f} {pruned['tasks'][CLOZE]['value']:.3f} "
              f"({time.perf_counter() - start - dense_s:.1f} s)")

    capsys.readouterr()
    assert main(["compare", str(run), "--output", str(tmp_path / "cmp")]) == 0
    assert f"{CHOICE} acc" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert table[f"{CHOICE} acc"].tolist() == [pruned["tasks"][CHOICE]["value"]]
    assert table["zero-shot avg"].tolist() == [pytest.approx(pruned["average"])]
    assert (tmp_path / "cmp" / "pruning_rates_overlay.png").stat().st_size > 10_000


def test_prune_and_train_evaluate_their_models(offline_tasks: Path, tiny_checkpoint: Path, wikitext: Path,
                                               tmp_path: Path) -> None:
    """prune.py --eval_tasks after pruning, and (passed on) the same after the recovery fine-tune."""
    small = tmp_path / "small-lora.yaml"
    small.write_text("finetune_samples: 4\nval_samples: 2\nseq_len: 32\ntest_before_finetune: false\n"
                     "test_after_finetune: false\n")
    run = tmp_path / "run"
    assert prune_main(["--model", str(tiny_checkpoint), "--pruning_ratio", "0.002", "--importance_method", "magnitude",
                       "--compensation", "none", "--test_before_prune", "false", "--test_after_prune", "false",
                       "--dataset", str(wikitext / "valid.txt"), "--eval_dataset", str(wikitext / "test.txt"),
                       "--eval_tasks", str(offline_tasks / f"{CLOZE}.yaml"),
                       "--eval_limit", "6", "--output", str(run), "--finetune", "--finetune_config", str(small)]) == 0
    for directory in (run, run / "finetune"):
        summary = json.loads((directory / "evaluation" / "zero_shot.json").read_text())
        assert summary["tasks"][CLOZE]["items"] == 6 and (directory / "evaluation" / "zero_shot.md").is_file()
        assert json.loads((directory / "evaluation_results.json").read_text())["zero_shot"][CLOZE] == \
            summary["tasks"][CLOZE]["value"]


def test_bad_input_is_one_line_and_leaves_nothing(offline_tasks: Path, tiny_checkpoint: Path, wikitext: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    unparsable = tmp_path / "broken.yaml"
    unparsable.write_text("task: [gp_wikitext_cloze\ndataset_path: json\n")
    not_a_task = tmp_path / "notes.yaml"
    not_a_task.write_text("title: my notes\n")
    no_data = tmp_path / "no-data.yaml"
    no_data.write_text((offline_tasks / f"{CLOZE}.yaml").read_text().replace(f"{CLOZE}.jsonl", "missing.jsonl"))
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no weights here\n")
    cases = [
        ([str(tiny_checkpoint), "--tasks", "boolqq"], "unknown lm-eval task 'boolqq' (did you mean boolq"),
        ([str(tiny_checkpoint), "--tasks", str(unparsable)], "does not parse"),
        ([str(tiny_checkpoint), "--tasks", str(not_a_task)], "has no task: (or group:) key"),
        ([str(tiny_checkpoint), "--tasks", str(tmp_path / "nowhere.yaml")], "no such task YAML file or folder"),
        ([str(tiny_checkpoint), "--tasks", str(no_data)], "does not load"),
        ([str(not_a_model), "--tasks", str(offline_tasks)], "has no config.json"),
        ([str(tiny_checkpoint), "--tasks", str(offline_tasks), "--limit", "0"], "eval_limit"),
    ]
    for args, expected in cases:
        assert main(["evaluate", *args, "--output", str(out)]) == 2, args
        assert expected in _error(capsys) and not out.exists(), args
    run = tmp_path / "run"
    assert prune_main(["--model", str(tiny_checkpoint), "--eval_tasks", str(unparsable), "--output", str(run)]) == 2
    assert "does not parse" in _error(capsys) and not run.exists()
    assert train_main(["--model", str(tiny_checkpoint), "--dataset", str(wikitext / "valid.txt"), "--eval_tasks",
                       "boolqq", "--output", str(run)]) == 2
    assert "unknown lm-eval task" in _error(capsys) and not run.exists()
    short = tmp_path / "short.txt"
    short.write_text(" = Title = \n\n A short paragraph .\n")
    assert main(["build-tasks", "--text", str(short), "--output", str(out)]) == 2
    assert "too few" in _error(capsys) and not out.exists()
