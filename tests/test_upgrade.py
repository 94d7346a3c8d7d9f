"""Checkpoints saved before modeling revision 2 are flagged on load and repaired by upgrade-checkpoint.

``tests/data/{llama,qwen2}-revision1`` were written by main's code before this revision (tiny
models: layer 0 without attention, layer 1 without MLP, layer 3 trimmed; the Llama one with output
biases). Their shipped modeling file generates wrong tokens for a left-padded batch on every
transformers release (and for any prompt on 5.24); after ``gp-lightning upgrade-checkpoint`` the
same files, loaded with ``trust_remote_code`` in a process without gp_lightning, generate what
the project's own classes generate.
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_generation import NEW_TOKENS, PAD, prompts, recompute, run_without_gp_lightning

from gp_lightning.cli import main
from gp_lightning.export.checkpoint import load_pruned
from gp_lightning.model.gp_pruned.revision import CURRENT_REVISION, StaleCheckpointCodeWarning, shipped_revision

DATA = Path(__file__).resolve().parent / "data"
ARCHS = ("llama", "qwen2")


def _digest(directory: Path, names: tuple[str, ...]) -> dict[str, str]:
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in names}


def _remote_generations(tmp_path: Path, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Greedy generations (``arch``) and their step logits (``arch.logits``) of both checkpoints loaded with
    trust_remote_code, in a process without gp_lightning."""
    inputs = tmp_path / "inputs.safetensors"
    save_file({"ids": ids, "mask": mask}, inputs)
    out = tmp_path / "remote.safetensors"
    run_without_gp_lightning(tmp_path, f"""
        from safetensors.torch import load_file, save_file
        data = load_file({str(inputs)!r})
        result = {{}}
        for arch in {list(ARCHS)!r}:
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + arch, trust_remote_code=True).eval()
            out = model.generate(data["ids"], attention_mask=data["mask"], max_new_tokens={NEW_TOKENS},
                                 do_sample=False, pad_token_id={PAD}, return_dict_in_generate=True, output_logits=True)
            result[arch], result[arch + ".logits"] = out.sequences, torch.stack(out.logits, 1).contiguous()
        save_file(result, {str(out)!r})
    """)
    from safetensors.torch import load_file

    return load_file(out)


def test_old_checkpoint_warns_and_upgrade_repairs_generation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for arch in ARCHS:
        shutil.copytree(DATA / f"{arch}-revision1", tmp_path / arch)
    ids, mask = prompts()
    expected, expected_logits = {}, {}
    for arch in ARCHS:
        assert shipped_revision(tmp_path / arch) == 1
        with pytest.warns(StaleCheckpointCodeWarning, match=f"gp-lightning upgrade-checkpoint {tmp_path / arch}"):
            model = load_pruned(tmp_path / arch)
        expected[arch], expected_logits[arch] = recompute(model, ids, mask)  # the project's classes are current
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                          pad_token_id=PAD), expected[arch])

    before = _remote_generations(tmp_path, ids, mask)
    for arch in ARCHS:  # the shipped revision-1 code gets the padded rows wrong (on 5.24 every row)
        wrong = (before[arch + ".logits"] - expected_logits[arch]).abs().amax(dim=(1, 2))
        assert (wrong[1:] > 1e-3).all(), (arch, wrong)

    kept = ("model.safetensors", "config.json", "generation_config.json")
    digests = {arch: _digest(tmp_path / arch, kept) for arch in ARCHS}
    capsys.readouterr()
    assert main(["upgrade-checkpoint", *(str(tmp_path / arch) for arch in ARCHS)]) == 0  # `gp-lightning upgrade-checkpoint`
    assert capsys.readouterr().out.count(f"revision 1 -> {CURRENT_REVISION}") == 2
    for arch in ARCHS:
        assert _digest(tmp_path / arch, kept) == digests[arch]  # weights and config untouched
        assert shipped_revision(tmp_path / arch) == CURRENT_REVISION
        assert not list((tmp_path / arch).glob(".*tmp"))
        with warnings.catch_warnings():
            warnings.simplefilter("error", StaleCheckpointCodeWarning)
            load_pruned(tmp_path / arch)

    after = _remote_generations(tmp_path, ids, mask)
    for arch in ARCHS:
        assert torch.equal(after[arch], expected[arch]), arch
        torch.testing.assert_close(after[arch + ".logits"], expected_logits[arch], rtol=0, atol=1e-5)


def test_upgrade_refuses_what_is_not_a_pruned_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import tiny_model

    dense = tmp_path / "dense"
    tiny_model("llama").save_pretrained(dense)
    listing = sorted(p.name for p in dense.iterdir())
    for target, message in ((dense, "not a gp-lightning pruned checkpoint"), (tmp_path / "nowhere", "not a directory")):
        assert main(["upgrade-checkpoint", str(target)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert sorted(p.name for p in dense.iterdir()) == listing  # nothing written


def test_the_revision_read_from_text_is_the_module_constant() -> None:
    from gp_lightning.model.gp_pruned.modeling_gp_pruned import MODELING_REVISION

    assert CURRENT_REVISION == MODELING_REVISION >= 2
