"""Command line and bad input: each gives a clear error and leaves no run directory behind."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from gp_lightning.cli import expand_aliases, parse_config, prune_main
from gp_lightning.runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_aliases_and_bare_switches() -> None:
    cfg = parse_config(["--base_model", "m", "--overwrite", "--remove_empty_layers", "--save_model", "false"])
    assert (cfg.source.model, cfg.run.overwrite, cfg.selection.remove_empty_layers, cfg.run.save_model) == (
        "m", True, True, False)
    assert expand_aliases(["--model_name_or_path=x"]) == ["--model=x"]


def test_table_and_selection_keys_parse_and_validate() -> None:
    cfg = parse_config(["--importance_method", "wanda", "--normalization", "log", "--normalization_level", "layer",
                        "--protected_layers", "[0,5]", "--max_rate", "0.7", "--table_only"])
    assert (cfg.calibration.importance_method, cfg.table.normalization, cfg.selection.protected_layers) == (
        "wanda", "log", [0, 5])
    assert cfg.table.table_only and cfg.selection.max_rate == 0.7 and cfg.selection.kept_channels == 1
    assert parse_config(["--remove_empty_layers"]).selection.kept_groups == 0  # depth pruning
    with pytest.raises(ConfigError, match="--importance_method fisher: expected one of taylor, taylor_2nd, wanda"):
        parse_config(["--importance_method", "fisher"])  # not a method: the choices, in one line
    with pytest.raises(ConfigError, match="min_rate"):
        parse_config(["--min_rate", "0.5", "--max_rate", "0.3"])
    with pytest.raises(ConfigError, match="from_table"):
        parse_config(["--table_only", "--from_table", "t.csv"])


@pytest.mark.parametrize("ratio", ["0", "1", "-0.1", "1.5"])
def test_ratio_out_of_range(ratio: str) -> None:
    with pytest.raises(ConfigError, match="pruning_ratio"):
        parse_config(["--pruning_ratio", ratio])


def test_yaml_config_with_unknown_key_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruning_ratio: 0.3\nprunning_ratio: 0.2\n")
    with pytest.raises(ConfigError, match="prunning_ratio"):
        parse_config(["--config", str(bad)])
    good = tmp_path / "good.yaml"
    good.write_text("pruning_ratio: 0.3\nnum_samples: 7\n")
    cfg = parse_config(["--config", str(good), "--num_samples", "9"])
    assert (cfg.selection.pruning_ratio, cfg.data.num_samples) == (0.3, 9)


@pytest.mark.parametrize("args,expected", [
    (["--pruning_ratio", "abc"], "error: --pruning_ratio abc: expected a float"),
    (["--pruning_ratio", "nan"], "error: --pruning_ratio nan: not a finite number"),
    (["--num_samples", "1.5"], "error: --num_samples 1.5: expected an int"),
    (["--no_such_flag", "1"], "error: unrecognized arguments: --no_such_flag 1"),
    (["--export_gguf", "q4"], "error: --export_gguf q4: expected one of f32, f16, bf16, q8_0 (or null)"),
])
def test_a_bad_flag_is_one_line_without_the_usage(capsys: pytest.CaptureFixture, args: list[str], expected: str
                                                  ) -> None:
    assert prune_main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [f"{expected} (prune.py --help lists every option)"]


def test_help_lists_every_option(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        prune_main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--pruning_ratio", "--importance_method", "--num_samples", "--seq_len", "--dataset",
                 "--eval_dataset", "--output", "--remove_empty_layers", "--test_before_prune",
                 "--test_after_prune", "--save_model", "--layer_start", "--layer_end", "--temperature", "--tau",
                 "--seed", "--overwrite", "--fisher_batch_size", "--clip_percentile_low", "--clip_percentile_high",
                 "--normalization", "--normalization_level", "--layer_depth_weight", "--min_rate", "--max_rate",
                 "--early_layers", "--early_layer_max_rate", "--protected_layers", "--min_attention_groups",
                 "--min_mlp_channels", "--table_only", "--from_table"):
        assert flag in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--pruning_ratio", "0"], "pruning_ratio"),
        (["--prunning_ratio", "0.2"], "unrecognized"),
        (["--model", "/no/such/model"], "not found"),
    ],
)
def test_bad_input_exits_cleanly_without_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)  # a relative --output, as typed in a shell
    text = _local_text(tmp_path)
    assert prune_main([*args, "--output", "runs/x", "--dataset", text, "--eval_dataset", text]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def _local_text(folder: Path) -> str:
    """A local text file: the data (hub datasets too) is checked before the model loads, so a test of a later error
    names text that is there."""
    (folder / "text.txt").write_text("A few words of text.\n")
    return str(folder / "text.txt")


def test_unsupported_architecture(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    text = _local_text(tmp_path)
    code = prune_main(["--model", str(tmp_path / "gpt2"), "--output", str(tmp_path / "run"), "--dataset", text,
                       "--eval_dataset", text])
    assert code == 2
    assert not (tmp_path / "run").exists()


def test_too_little_calibration_text(tmp_path: Path, tiny_checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of text here.\n")
    code = prune_main(["--model", str(tiny_checkpoint), "--dataset", str(short), "--num_samples", "4",
                       "--pruning_ratio", "0.001", "--output", str(tmp_path / "run"), "--eval_dataset",
                       _local_text(tmp_path)])
    assert code == 2
    assert "too short" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_accelerate_cpu_single_process_trap_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from gp_lightning.runtime.launch import launcher_warning

    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "--multi_gpu" in launcher_warning()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launcher_warning() is None


@pytest.mark.parametrize("name,content,message", [
    ("latin1.txt", "Caf\u00e9 au lait. ".encode("latin-1") * 400,
     r"latin1.txt is not utf-8 text: byte 3 is 0xe9. Pass its encoding \(e.g. --text_encoding latin-1\)"),
    ("binary.txt", bytes(range(256)) * 40, r"binary.txt is not utf-8 text: byte 128 is 0x80"),
    ("broken.jsonl", b'{"text": "one"}\n{"text": "two"\n', r"broken.jsonl:2: not valid JSON \(Expecting ',' delimiter"),
])
def test_unreadable_text_is_one_line_naming_the_file(tmp_path: Path, tiny_checkpoint: Path,
                                                     capsys: pytest.CaptureFixture, name: str, content: bytes,
                                                     message: str) -> None:
    (tmp_path / name).write_bytes(content)
    code = prune_main(["--model", str(tiny_checkpoint), "--dataset", str(tmp_path / name), "--num_samples", "4",
                       "--pruning_ratio", "0.001", "--output", str(tmp_path / "run"), "--eval_dataset",
                       _local_text(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.search(f"^error: .*{message}", err, re.MULTILINE)
    assert not (tmp_path / "run").exists()


def test_text_encoding_reads_a_latin1_file_as_its_utf8_twin(tmp_path: Path) -> None:
    from gp_lightning.data.sources import load_text

    text = "Caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e. " * 50
    (tmp_path / "latin1.txt").write_bytes(text.encode("latin-1"))
    assert load_text(str(tmp_path / "latin1.txt"), "calibration", "latin-1") == text
    cfg = parse_config(["--text_encoding", "latin-1", "--model", "x"])
    assert cfg.data.text_encoding == "latin-1"
    with pytest.raises(ConfigError, match="text_encoding.*not an encoding Python knows"):
        parse_config(["--text_encoding", "klingon-8", "--model", "x"])


@pytest.mark.parametrize("method", ["taylor", "wanda", "random"])
def test_nan_weights_are_named_at_load(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path,
                                       capsys: pytest.CaptureFixture, method: str) -> None:
    """Whatever the method (random would otherwise 'succeed' with a NaN perplexity), the damaged tensor is named."""
    broken = _edited_checkpoint(tiny_checkpoint, tmp_path,
                                lambda tensors: tensors["model.layers.1.mlp.down_proj.weight"][0, :3].fill_(float("nan")))
    code = prune_main(["--model", str(broken), "--importance_method", method, "--dataset",
                       str(wikitext / "valid.txt"), "--eval_dataset", str(wikitext / "test.txt"), "--num_samples", "4",
                       "--precision", "32-true", "--pruning_ratio", "0.001", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "overflowed" not in err
    assert "tensor 'model.layers.1.mlp.down_proj.weight' has 3 NaN or infinite values" in err
    assert not (tmp_path / "run").exists()


def _edited_checkpoint(tiny_checkpoint: Path, folder: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of the tiny checkpoint whose tensors ``edit`` changed in place (a damaged download, as users meet it)."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = folder / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    tensors = load_file(broken / "model.safetensors")
    edit(tensors)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def _misplace_down_proj(tensors: dict, extra: bool) -> None:
    """Layer 1's down_proj goes missing, or (``extra``) a copy of it appears as a layer 7 the config lacks."""
    if extra:
        tensors["model.layers.7.mlp.down_proj.weight"] = tensors["model.layers.1.mlp.down_proj.weight"].clone()
    else:
        del tensors["model.layers.1.mlp.down_proj.weight"]


@pytest.mark.parametrize("extra,message", [
    (False, "1 missing (e.g. 'model.layers.1.mlp.down_proj.weight') tensor(s)"),
    (True, "1 unexpected (e.g. 'model.layers.7.mlp.down_proj.weight') tensor(s)"),
])
def test_weights_that_do_not_cover_the_config_are_refused_at_load(tmp_path: Path, tiny_checkpoint: Path,
                                                                  capsys: pytest.CaptureFixture, extra: bool,
                                                                  message: str) -> None:
    """transformers would initialize a missing layer at random (and only warn): never prune or evaluate that."""
    broken = _edited_checkpoint(tiny_checkpoint, tmp_path, lambda tensors: _misplace_down_proj(tensors, extra))
    text = _local_text(tmp_path)
    code = prune_main(["--model", str(broken), "--dataset", text, "--eval_dataset", text, "--output",
                       str(tmp_path / "run")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and errors == [err.splitlines()[-1]], err
    assert f"Model '{broken}': its weights do not match its config.json: {message}" in errors[0]
    assert not (tmp_path / "run").exists()


def test_sigterm_ends_the_run_with_a_failure_status(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path,
                                                    capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """What slurm sends before a requeue or at the time limit: the run stops at once, status 143, one line.

    The signal arrives inside the calibration loop (at its third batch), where Lightning alone would end the
    loop and exit with status 0."""
    import os
    import signal

    from gp_lightning.calibration.module import CalibrationModule

    step = CalibrationModule.training_step
    batches = []

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN202 - the module's own signature
        batches.append(batch_idx)
        if batch_idx == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(CalibrationModule, "training_step", training_step)
    before = signal.getsignal(signal.SIGTERM)
    code = prune_main(["--model", str(tiny_checkpoint), "--dataset", str(wikitext / "valid.txt"), "--eval_dataset",
                       str(wikitext / "test.txt"), "--num_samples",
                       "64", "--seq_len", "32", "--batch_size", "1", "--pruning_ratio", "0.001", "--precision",
                       "32-true", "--output", str(tmp_path / "run"), "--test_before_prune", "false"])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM and batches[-1] <= 3  # not the 64 batches Lightning would have run
    assert "error: interrupted by SIGTERM" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == before  # the handlers are given back


@pytest.mark.parametrize("where,message", [
    ("root", "is the file system root"),
    ("home", "is your home directory"),
    ("project", "is a project's root directory"),
    ("inside_file", "which is a file"),
    ("user_dir", "is not empty and holds no gp-lightning run (notes.txt, weights)"),
])
def test_output_never_takes_a_place_that_is_not_a_run_directory(tmp_path: Path, tiny_checkpoint: Path,
                                                                 capsys: pytest.CaptureFixture, where: str,
                                                                 message: str) -> None:
    """Even --overwrite does not make /, home or a project root a run directory; other people's files are kept."""
    user = tmp_path / "mine"
    (user / "weights").mkdir(parents=True)
    (user / "notes.txt").write_text("keep me")
    (tmp_path / "a_file").write_text("x")
    output = {"root": Path("/"), "home": Path.home(), "project": ROOT, "inside_file": tmp_path / "a_file" / "run",
              "user_dir": user}[where]
    overwrite = [] if where == "user_dir" else ["--overwrite"]
    assert prune_main(["--model", str(tiny_checkpoint), "--output", str(output), *overwrite]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "--output" in err
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt", "weights"]
    assert not (ROOT / "config.yaml").exists() and not (Path.home() / "config.yaml").exists()


def test_a_killed_save_leaves_no_staging_behind_and_results_get_the_usual_mode(tmp_path: Path) -> None:
    import os

    from gp_lightning.runtime.io import staged_directory

    dead = tmp_path / ".model.tmp-999999999-abcd"  # a pid that cannot be running
    live = tmp_path / f".model.tmp-{os.getpid()}-efgh"  # another save of this very process, still going
    dead.mkdir()
    live.mkdir()
    with staged_directory(tmp_path / "model") as staging:
        (staging / "weights.bin").write_bytes(b"1")
    assert not dead.exists() and live.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask


@pytest.mark.parametrize("case,message", [
    ("no_config", "has no config.json, so it is not a Hugging Face model directory"),
    ("made_up_type", "Architecture 'llamazing' is not supported"),
])
def test_a_model_directory_is_checked_before_transformers_reads_it(tmp_path: Path, tiny_checkpoint: Path,
                                                                   capsys: pytest.CaptureFixture, case: str,
                                                                   message: str) -> None:
    """transformers would blame a missing model_type key and suggest upgrading itself."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    if case == "no_config":
        (model / "config.json").unlink()
    else:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "model_type": "llamazing"}))
    text = _local_text(tmp_path)
    assert prune_main(["--model", str(model), "--output", str(tmp_path / "run"), "--dataset", text,
                       "--eval_dataset", text]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "upgrade" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["read_only", "disk_full", "safetensors_disk_full"])
def test_an_output_that_cannot_be_written_is_one_line(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path,
                                                      capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch,
                                                      case: str) -> None:
    """The file system's refusal as the user meets it (simulated: this machine's tests run as root on a big disk)."""
    import errno

    import transformers.modeling_utils
    from safetensors import SafetensorError

    def refuse(*args: object, **kwargs: object) -> None:
        if case == "read_only":
            raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "config.yaml"))
        if case == "disk_full":
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "model.safetensors"))
        Path(str(args[1])).write_bytes(b"\0" * 8)  # safetensors made the file, then the disk filled up
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    if case == "read_only":
        monkeypatch.setattr("gp_lightning.runtime.recipe.open_run_log", refuse)
    else:
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", refuse)  # what save_pretrained calls
    code = prune_main(["--model", str(tiny_checkpoint), "--output", str(tmp_path / "run"), "--num_samples", "4",
                       "--seq_len", "32", "--dataset", str(wikitext / "valid.txt"), "--test_before_prune", "false",
                       "--test_after_prune", "false", "--pruning_ratio", "0.001", "--compensation", "none"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(errors) == 1, err
    expected = {"read_only": "config.yaml: Read-only file system", "disk_full": "No space left on device",
                "safetensors_disk_full": f"{tmp_path / 'run' / 'model' / 'model.safetensors'}: No space left on device"
                }[case]
    assert expected in errors[0] and "--output" in errors[0]
