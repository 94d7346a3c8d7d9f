"""Round trip: a saved pruned model reloads (both loaders) with identical logits and generations."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import tiny_model

from gp_lightning.export.checkpoint import load_pruned, save_pruned
from gp_lightning.model.layout import describe
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.surgery.in_memory import apply_plan


def _pruned() -> torch.nn.Module:
    dense = tiny_model("qwen2", gqa=2, num_kv=3, layers=4)
    layout = describe(dense)
    plan = PruningPlan.from_removals(
        layout, {0: {0, 1, 2}, 1: {1}, 3: {0, 1, 2}}, {1: {2, 3}, 2: set(range(24)), 3: set(range(24))},
        remove_empty_layers=True,
    )
    return apply_plan(dense, layout, plan, {"note": "test"})


def test_reload_with_project_loader(tmp_path: Path) -> None:
    model = _pruned()
    save_pruned(model, None, tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "gp_pruned"
    assert config["per_layer_config"]["0"]["skip"] == ["self_attn"]
    assert config["num_hidden_layers"] == 3
    assert "allow_global_per_layer_attribute_access" not in config
    reloaded = load_pruned(tmp_path / "model")
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], **kwargs), reloaded.generate(ids[:1], **kwargs))


def test_reload_with_trust_remote_code_without_gp_lightning(tmp_path: Path) -> None:
    model = _pruned()
    save_pruned(model, None, tmp_path / "model")
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, tmp_path / "logits.pt")
        torch.save(model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0), tmp_path / "gen.pt")
    script = textwrap.dedent(f"""
        import sys
        project = {str(Path(__file__).resolve().parent.parent)!r}
        sys.path = [p for p in sys.path if p and p not in (project, project + "/tests")]
        sys.modules["gp_lightning"] = None  # as if gp_lightning were not installed
        try:
            import gp_lightning  # noqa: F401
            raise SystemExit("gp_lightning is importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        expected = torch.load({str(tmp_path / "logits.pt")!r})
        assert torch.equal(logits, expected), (logits - expected).abs().max()
        gen = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(gen, torch.load({str(tmp_path / "gen.pt")!r}))
        print("REMOTE-OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK" in result.stdout
