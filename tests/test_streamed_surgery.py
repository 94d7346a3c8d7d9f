"""Streamed surgery writes what the in-memory path writes, in bounded memory, and fails clearly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from gp_lightning.export.checkpoint import load_pruned, save_pruned
from gp_lightning.model.layout import ModelLayout, describe
from gp_lightning.model.weights import describe_checkpoint
from gp_lightning.runtime.errors import ModelSourceError
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.surgery.in_memory import apply_plan
from gp_lightning.surgery.streamed import stream_prune

PROVENANCE = {"method": "test", "ratio": 0.3}


def _plan(layout: ModelLayout, remove_empty_layers: bool) -> PruningPlan:
    """Groups and channels removed here and there, layer 1 without attention, layer 2 without MLP, layer 3 emptied."""
    inter = layout.layers[0].intermediate_size
    kv = layout.layers[0].num_kv_heads
    groups = {0: {kv - 1}, 1: set(range(kv)), 2: {0}, 3: set(range(kv))}
    channels = {0: {1, 5, 7}, 1: set(range(0, inter, 2)), 2: set(range(inter)), 3: set(range(inter))}
    return PruningPlan.from_removals(layout, groups, channels, remove_empty_layers)


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``directory``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        part = load_file(path)
        assert not set(part) & set(tensors), f"{path.name} repeats tensors"
        tensors.update(part)
    return tensors


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _tokenizer() -> PreTrainedTokenizerFast:
    """A tiny word-level tokenizer, built offline."""
    vocab = {"[UNK]": 0, "[PAD]": 1, "the": 2, "model": 3}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
                                   unk_token="[UNK]", pad_token="[PAD]")


def _assert_same_checkpoint(reference: Path, streamed: Path) -> None:
    """Same files; same tensors; every JSON file (config, index, generation config, tokenizer) the same.

    Nothing is ignored: the index too is identical since the shard split is save_pretrained's.
    """
    names = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in streamed.iterdir()) == names
    assert {"config.json", "generation_config.json", "modeling_gp_pruned.py", "configuration_gp_pruned.py"} <= set(names)
    want, got = _tensors(reference), _tensors(streamed)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name
    for name in names:
        if name.endswith(".json"):
            assert _json(streamed / name) == _json(reference / name), name
        elif not name.endswith(".safetensors"):
            assert (streamed / name).read_bytes() == (reference / name).read_bytes(), name
    for path in streamed.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}


@pytest.mark.parametrize(
    "arch,gqa,num_kv,extra,remove_empty_layers,shard_size",
    [
        ("llama", 2, 2, {}, True, "20KB"),  # layer 3 is dropped, the following ones renumbered
        ("qwen2", 2, 3, {}, False, "20KB"),  # q/k/v biases; the emptied layer stays, both blocks skipped
        ("llama", 2, 2, {"attention_bias": True, "mlp_bias": True}, True, "20KB"),  # bias-only blocks stay
        ("llama", 1, 3, {"tie_word_embeddings": True}, True, "20KB"),  # no lm_head.weight stored
        ("mistral", 4, 2, {}, True, None),  # unsharded source and output: a single model.safetensors
    ],
)
def test_streamed_equals_in_memory(tmp_path: Path, arch: str, gqa: int, num_kv: int, extra: dict,
                                   remove_empty_layers: bool, shard_size: str | None) -> None:
    source = tmp_path / "dense"
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    tiny_model(arch, gqa=gqa, num_kv=num_kv, layers=4, **extra).save_pretrained(source, **kwargs)
    if shard_size:
        assert len(list(source.glob("model-*.safetensors"))) >= 4
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    layout = describe(dense)
    assert describe_checkpoint(source) == layout  # the meta-device layout is the loaded model's
    plan = _plan(layout, remove_empty_layers)

    in_memory = apply_plan(dense, layout, plan, PROVENANCE)
    tokenizer = _tokenizer()
    reference = save_pruned(in_memory, tokenizer, tmp_path / "reference", **kwargs)
    streamed = stream_prune(source, layout, plan, PROVENANCE, tmp_path / "streamed", tokenizer=tokenizer, **kwargs)

    assert streamed == tmp_path / "streamed"
    _assert_same_checkpoint(reference, streamed)
    sharded = (streamed / "model.safetensors.index.json").exists()
    assert sharded == bool(shard_size) and (streamed / "model.safetensors").exists() != sharded
    if extra.get("tie_word_embeddings"):
        assert "lm_head.weight" not in _tensors(streamed)
    config = _json(streamed / "config.json")
    assert config["num_hidden_layers"] == len(plan.kept_layers) == (3 if plan.dropped(3) else 4)
    assert not list(tmp_path.glob(".streamed*")), "staging directory left behind"

    reloaded = load_pruned(streamed)
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, in_memory(input_ids=ids).logits)


def test_stored_tied_lm_head_and_unused_buffer_are_dropped_and_bf16_kept(tmp_path: Path) -> None:
    """A bf16 tied checkpoint that stores lm_head anyway and an old-style rotary buffer: as save_pruned."""
    source = tmp_path / "dense"
    tiny_model("qwen2", gqa=2, num_kv=2, layers=4, tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(source)
    weights = load_file(source / "model.safetensors")
    assert "lm_head.weight" not in weights
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)  # from_pretrained ignores it
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    dense = AutoModelForCausalLM.from_pretrained(source).eval()
    layout = describe(dense)
    plan = _plan(layout, True)

    reference = save_pruned(apply_plan(dense, layout, plan, PROVENANCE), None, tmp_path / "reference")
    streamed = stream_prune(source, layout, plan, PROVENANCE, tmp_path / "streamed")
    _assert_same_checkpoint(reference, streamed)
    assert {t.dtype for t in _tensors(streamed).values()} == {torch.bfloat16}
    assert _json(streamed / "config.json")["dtype"] == "bfloat16"


@pytest.mark.parametrize("reader", ["streamed surgery", "sharded load"])
def test_a_stored_tensor_the_config_lacks_is_refused_not_ignored(tmp_path: Path, reader: str) -> None:
    """An extra layer's tensor (a checkpoint of another config): refused as a load in memory refuses it, while the
    rotary buffer old checkpoints store is still fine. A missing tensor is refused by the sharded load up front."""
    source = tmp_path / "dense"
    tiny_model("llama", layers=4).save_pretrained(source)
    weights = load_file(source / "model.safetensors")
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)
    weights["model.layers.7.mlp.down_proj.weight"] = weights["model.layers.1.mlp.down_proj.weight"].clone()
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    layout = describe_checkpoint(source)
    with pytest.raises(ModelSourceError) as raised:
        if reader == "streamed surgery":
            stream_prune(source, layout, _plan(layout, False), PROVENANCE, tmp_path / "out")
        else:
            from gp_lightning.model.sharded import meta_model

            meta_model(source, torch.float32)
    message = str(raised.value)
    assert "1 unexpected (e.g. 'model.layers.7.mlp.down_proj.weight')" in message and "inv_freq" not in message
    assert ("1 missing (e.g. 'model.layers.2.mlp.up_proj.weight')" in message) == (reader == "sharded load")
    assert not (tmp_path / "out").exists()


def test_replaces_existing_output_and_cleans_up_on_mismatch(tmp_path: Path) -> None:
    source = tmp_path / "dense"
    tiny_model("llama", layers=4).save_pretrained(source)
    layout = describe_checkpoint(source)
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old run")
    stream_prune(source, layout, _plan(layout, False), PROVENANCE, output)
    assert not (output / "stale.txt").exists() and (output / "model.safetensors").exists()

    other = tmp_path / "other"
    tiny_model("llama", layers=4, intermediate_size=32).save_pretrained(other)
    wrong_layout = describe_checkpoint(other)  # wider MLPs than the checkpoint in `source`
    before = sorted(p.name for p in output.iterdir())
    with pytest.raises(ModelSourceError, match="does not match the checkpoint"):
        stream_prune(source, wrong_layout, _plan(wrong_layout, False), PROVENANCE, output)
    assert sorted(p.name for p in output.iterdir()) == before  # the previous result is untouched
    assert not list(tmp_path.glob(".out*")), "staging directory left behind"


def test_source_without_safetensors_is_a_clear_error(tmp_path: Path) -> None:
    model = tiny_model("llama", layers=2)
    layout = describe(model)
    plan = PruningPlan.from_removals(layout, {0: {0}}, {})

    bin_only = tmp_path / "bin-only"
    model.config.save_pretrained(bin_only)
    torch.save(model.state_dict(), bin_only / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match=r"no model\.safetensors.*only pytorch_model\.bin.*save_pretrained"):
        stream_prune(bin_only, layout, plan, {}, tmp_path / "out")

    empty = tmp_path / "empty"
    model.config.save_pretrained(empty)
    with pytest.raises(ModelSourceError, match="no weight files at all"):
        stream_prune(empty, layout, plan, {}, tmp_path / "out")

    with pytest.raises(ModelSourceError, match="not a directory"):
        stream_prune(tmp_path / "missing", layout, plan, {}, tmp_path / "out")

    broken = tmp_path / "broken"
    model.save_pretrained(broken, max_shard_size="20KB")
    next(broken.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ModelSourceError, match="missing.*download the model again"):
        stream_prune(broken, layout, plan, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


# Runs in a fresh process, so that its peak resident set reflects streamed surgery only. The peak
# is the kernel's VmHWM, reset just before surgery: ru_maxrss would not do, as a child started with
# vfork + exec (what subprocess does) inherits the parent's peak in it, i.e. pytest's.
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, time
    from pathlib import Path

    import numpy, safetensors.torch  # noqa: F401  (imported lazily by save_file; not surgery's memory)

    from gp_lightning.model.weights import describe_checkpoint
    from gp_lightning.surgery.streamed import stream_prune
    from gp_lightning.selection.plan import PruningPlan

    source, output, shard_size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    layout = describe_checkpoint(source)  # meta-device model: no weights loaded
    last = layout.num_layers - 1
    groups = {i: {0} for i in range(layout.num_layers)} | {last: set(range(layout.layers[last].num_kv_heads))}
    channels = {i: set(range(0, layer.intermediate_size, 3)) for i, layer in enumerate(layout.layers)}
    channels[last] = set(range(layout.layers[last].intermediate_size))
    plan = PruningPlan.from_removals(layout, groups, channels, remove_empty_layers=True)

    def memory():
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if line.startswith("Vm"))
        kib = {key: int(status[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}
        return {"rss": kib["VmRSS"], "hwm": kib["VmHWM"],
                "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    before = memory()
    start = time.perf_counter()
    stream_prune(source, layout, plan, {}, output, max_shard_size=shard_size)
    seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "after": memory(), "seconds": seconds}))
""")


def test_peak_memory_is_bounded_by_shards(tmp_path: Path) -> None:
    """Peak RSS grows by less than two input shards, although the model is five shards big."""
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1792, num_hidden_layers=14,
                         num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    source = tmp_path / "dense"
    model.save_pretrained(source, max_shard_size=total // 5 + 1)
    del model
    shards = sorted(source.glob("model-*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    assert len(shards) >= 4

    output = tmp_path / "pruned"
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(source), str(output), str(total // 5 + 1)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    m = json.loads(result.stdout.strip().splitlines()[-1])
    increase = m["after"]["hwm"] - m["before"]["rss"]
    out_shards = sorted(output.glob("model-*.safetensors"))
    mb = 1e6
    print(f"\nstreamed surgery of {total / mb:.0f} MB in {len(shards)} shards (largest {largest / mb:.1f} MB) -> "
          f"{len(out_shards)} shards in {m['seconds']:.2f} s. RSS before {m['before']['rss'] / mb:.0f} MB, peak during "
          f"{m['after']['hwm'] / mb:.0f} MB: increase {increase / mb:.1f} MB = {increase / largest:.2f} x the largest "
          f"input shard. (ru_maxrss before/after {m['before']['ru_maxrss'] / mb:.0f}/{m['after']['ru_maxrss'] / mb:.0f} "
          "MB: the parent's peak, inherited)")
    assert len(out_shards) >= 3
    assert increase < 2 * largest
    # and the measurement is live: a whole output shard did pass through memory
    assert increase > max(p.stat().st_size for p in out_shards) / 2
