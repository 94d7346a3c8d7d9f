"""Calibration mixtures (issue 29, item 2): ``dataset`` naming several sources with weights.

One source draws exactly today's windows; a mixture splits every prefix of its windows by the weights
(Sainte-Lague), each source's windows being the ones it would give alone; the seed decides them; a .txt + .jsonl
mixture prunes end to end; every bad mixture is one line, before anything is written.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import TINY_CHECKPOINT_PRUNABLE

from gp_lightning.cli import parse_config, prune_main
from gp_lightning.data.mixture import mixture_windows, parse_mixture, window_sources
from gp_lightning.data.sources import load_text
from gp_lightning.data.windows import calibration_windows, tokenize

SEQ = 32


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture
def texts(tmp_path: Path, wikitext: Path) -> tuple[Path, Path]:
    """Two small real texts: a .txt (WikiText-2 valid) and a .jsonl of records (WikiText-2 test's paragraphs)."""
    txt = tmp_path / "a.txt"
    txt.write_text((wikitext / "valid.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    paragraphs = [p for p in (wikitext / "test.txt").read_text(encoding="utf-8")[:40_000].split("\n") if p.strip()]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    return txt, jsonl


def _alone(source: Path, tokenizer: object, count: int, seed: int) -> torch.Tensor:
    """The windows ``source`` gives alone (today's rule)."""
    return calibration_windows(tokenize(load_text(str(source), "calibration"), tokenizer), count, SEQ, seed)


def test_one_source_gives_todays_windows(tokenizer: object, wikitext: Path) -> None:
    valid = wikitext / "valid.txt"
    today = calibration_windows(tokenize(load_text(str(valid), "calibration"), tokenizer), 40, 128, 42)
    for spec in (str(valid), f"[{valid}]", f"{{{valid}: 3}}", f"[{valid}: 1, {wikitext / 'test.txt'}: 0]"):
        windows = mixture_windows(spec, tokenizer, 40, 128, 42)
        assert windows.dtype == today.dtype and torch.equal(windows, today), spec


def _webster(weights: tuple[Fraction, ...], counts: list[int]) -> bool:
    """``counts`` is a Sainte-Lague (Webster) apportionment of ``weights``: one divisor d puts every w_i / d within
    half a window of c_i."""
    low = max(w / (c + Fraction(1, 2)) for w, c in zip(weights, counts, strict=True))
    high = min((w / (c - Fraction(1, 2)) for w, c in zip(weights, counts, strict=True) if c > 0), default=None)
    return high is None or low <= high


@pytest.mark.parametrize("weights,at_32", [
    ((1, 1, 1), [11, 11, 10]), ((3, 1), [24, 8]), ((0.7, 0.3), [22, 10]), ((5, 2, 1), [20, 8, 4]), ((1, 9), [3, 29]),
])
def test_every_prefix_of_the_windows_is_split_by_the_weights(weights: tuple[float, ...], at_32: list[int]) -> None:
    exact = tuple(Fraction(str(w)) for w in weights)
    order = window_sources(exact, 64)
    for n in range(1, 65):
        counts = [order[:n].count(i) for i in range(len(weights))]
        assert sum(counts) == n and _webster(exact, counts), (n, counts)
        shares = [n * w / sum(exact) for w in exact]
        assert all(abs(c - s) < 1 for c, s in zip(counts, shares, strict=True)), (n, counts, shares)
    assert [order[:32].count(i) for i in range(len(weights))] == at_32


def test_a_mixture_takes_each_sources_own_windows_by_weight(tokenizer: object, texts: tuple[Path, Path]) -> None:
    txt, jsonl = texts
    spec = f"[{txt}: 3, {jsonl}: 1]"
    windows = mixture_windows(spec, tokenizer, 32, SEQ, 7)
    order = torch.tensor(window_sources(parse_mixture(spec).weights, 32))
    assert int((order == 0).sum()) == 24 and int((order == 1).sum()) == 8
    assert torch.equal(windows[order == 0], _alone(txt, tokenizer, 24, 7))
    assert torch.equal(windows[order == 1], _alone(jsonl, tokenizer, 8, 7))
    more = mixture_windows(spec, tokenizer, 48, SEQ, 7)
    assert torch.equal(more[:32], windows)  # the calibration windows are the first of the compensation's


def test_the_seed_decides_the_windows(tokenizer: object, texts: tuple[Path, Path]) -> None:
    spec = f"[{texts[0]}, {texts[1]}]"
    first = mixture_windows(spec, tokenizer, 16, SEQ, 1)
    assert torch.equal(first, mixture_windows(spec, tokenizer, 16, SEQ, 1))
    other = mixture_windows(spec, tokenizer, 16, SEQ, 2)
    assert not torch.equal(first[0::2], other[0::2]) and not torch.equal(first[1::2], other[1::2])


def test_a_txt_and_jsonl_mixture_prunes_end_to_end(tmp_path: Path, tiny_checkpoint: Path, tokenizer: object,
                                                   texts: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibration reads the mixture's first num_samples windows, the compensation its first compensation_samples."""
    from gp_lightning import pipeline

    seen: dict[str, torch.Tensor] = {}

    def spy(name: str, position: int) -> None:
        real = getattr(pipeline, name)

        def record(*args: object, **kwargs: object) -> object:
            seen[name] = args[position]  # type: ignore[assignment]
            return real(*args, **kwargs)
        monkeypatch.setattr(pipeline, name, record)

    spy("run_calibration", 2)
    spy("compensate", 3)
    txt, jsonl = texts
    run = tmp_path / "run"
    code = prune_main(["--model", str(tiny_checkpoint), "--output", str(run), "--pruning_ratio",
                       str(0.3 * TINY_CHECKPOINT_PRUNABLE), "--dataset", f"[{txt}: 0.5, {jsonl}: 0.5]",
                       "--num_samples", "6", "--compensation_samples", "10", "--seq_len", str(SEQ),
                       "--eval_dataset", str(txt), "--eval_max_windows", "4", "--eval_seq_len", str(SEQ),
                       "--save_model", "false", "--accelerator", "cpu", "--precision", "32-true"])
    assert code == 0
    log = (run / "training.log").read_text()
    assert (f"calibration mixture, windows per source: 3 of {txt} (5 of the compensation's), 3 of {jsonl} (5 of the "
            "compensation's)") in log
    again = parse_config(["--config", str(run / "config.yaml")])  # the run's config.yaml runs it again
    assert again.data.dataset == f"[{txt}: 0.5, {jsonl}: 0.5]"
    results = json.loads((run / "evaluation_results.json").read_text())
    assert results["ppl_after"] > 1
    expected = mixture_windows(f"[{txt}, {jsonl}]", tokenizer, 10, SEQ, 42)  # the default seed
    assert torch.equal(seen["run_calibration"], expected[:6]) and torch.equal(seen["compensate"], expected)


def _one_error(capsys: pytest.CaptureFixture, code: int, run: Path) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert not run.exists()
    return errors[0]


@pytest.mark.parametrize("spec,message", [
    ("[{a}, {b}", "is not a list of sources (expected ',' or ']', but got '<stream end>'): write e.g. "
                  "[wikitext2, my.txt] (equal weights) or [wikitext2: 0.7, my.txt: 0.3]"),
    ("[]", "names no source: write e.g."),
    ("[{a}, [{b}]]", "which is neither a source nor 'source: weight'"),
    ("[{a}: 1, {b}: -0.5]", "gives '{b}' the weight -0.5: weights must not be negative"),
    ("[{a}: 0, {b}: 0]", "has weights that sum to 0: give a source a positive weight"),
    ("[{a}: 1, {b}: lots]", "gives '{b}' the weight 'lots', not a finite number: write '{b}: 0.5'"),
    ("[{a}, {b}: 1]", "weights some sources and not others: give every source a weight, or none"),
    ("[{a}, {a}]", "names '{a}' twice: list it once, with the sum of its weights"),
    ("[{a}, bookcorpus]", "Unknown dataset 'bookcorpus'. Use one of wikitext2, c4"),
    ("[{a}, {missing}]", "Dataset file '{missing}' does not exist"),
    ("[{a}, {latin}]", "{latin} is not utf-8 text: byte 3 is 0xe9. Pass its encoding (e.g. --text_encoding latin-1)"),
    ("[{a}: 1, {short}: 1]", "Calibration source '{short}' is too short: "),
    ("[{a}: 1, {bad_jsonl}: 1]", "{bad_jsonl}:2: expected a JSON object with a 'text' field"),
])
def test_a_bad_mixture_is_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      tiny_checkpoint: Path, texts: tuple[Path, Path], spec: str,
                                                      message: str) -> None:
    paths = {"a": texts[0], "b": texts[1], "missing": tmp_path / "nope.txt", "latin": tmp_path / "latin.txt",
             "short": tmp_path / "short.txt", "bad_jsonl": tmp_path / "bad.jsonl"}
    paths["latin"].write_bytes("Caf\u00e9s and more words of plain text. ".encode("latin-1") * 50)
    paths["short"].write_text("Only a few words.\n", encoding="utf-8")
    paths["bad_jsonl"].write_text('{"text": "one record"}\n["not", "an", "object"]\n', encoding="utf-8")
    run = tmp_path / "run"
    code = prune_main(["--model", str(tiny_checkpoint), "--output", str(run), "--dataset", spec.format(**paths),
                       "--pruning_ratio", str(0.3 * TINY_CHECKPOINT_PRUNABLE), "--num_samples", "8", "--seq_len",
                       str(SEQ), "--eval_dataset", str(texts[0]), "--accelerator", "cpu"])
    assert message.format(**paths) in _one_error(capsys, code, run)


def test_fine_tuning_refuses_a_mixture_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   texts: tuple[Path, Path]) -> None:
    run = tmp_path / "run"
    code = prune_main(["--dataset", f"[{texts[0]}, {texts[1]}]", "--finetune", "--output", str(run)])
    assert ("is a list of sources, and fine-tuning reads one: pass one file or hub name (prune.py --finetune: set "
            "fine-tuning's own dataset in --finetune_config)") in _one_error(capsys, code, run)
    (tmp_path / "c.yaml").write_text(f"dataset: [{texts[0]}, {texts[1]}]\n", encoding="utf-8")
    code = prune_main(["--config", str(tmp_path / "c.yaml"), "--output", str(run)])
    assert 'dataset is a YAML list, but it is one string' in _one_error(capsys, code, run)
