"""Recovery fine-tuning on a tiny pruned model with uneven layers and a removed block.

LoRA trains only adapters and lowers the loss; the merged model equals the unmerged peft model and
reloads (project loader and trust_remote_code) to identical logits; full mode trains everything;
instruction data puts the loss on the response only; the CLIs and prune.py --finetune work. Two ranks
fine-tuning as one process (DDP and FSDP, with a distillation teacher) is checked by
tests/test_launchers.py, whose launches prune and then fine-tune.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, tiny_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from gp_lightning.cli import prune_main, train_main
from gp_lightning.export.checkpoint import load_pruned, save_pruned
from gp_lightning.finetune.config import FinetuneConfig
from gp_lightning.finetune.data import IGNORE, collate, instruction_example, load_examples, render_prompt
from gp_lightning.finetune.module import masked_lm_loss
from gp_lightning.finetune.recipe import FinetuneRecipe, finetune
from gp_lightning.model.layout import describe
from gp_lightning.runtime.errors import ConfigError, DataError
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.surgery.in_memory import apply_plan

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """Tiny Llama pruned unevenly: layer 1 loses its whole attention block, layers 0 and 2 lose channels."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()
    layout = describe(model)
    plan = PruningPlan.from_removals(layout, {1: {0, 1}}, {0: {1, 5, 7}, 2: set(range(10))}, remove_empty_layers=True)
    path = tmp_path_factory.mktemp("pruned") / "model"
    save_pruned(apply_plan(model, layout, plan, {"base_model": str(tiny_checkpoint)}), tokenizer, path)
    return path


def settings(checkpoint: Path, output: Path, wikitext: Path, **overrides: object) -> FinetuneConfig:
    values: dict[str, object] = dict(
        model=str(checkpoint), output=str(output), dataset=str(wikitext / "valid.txt"),
        eval_dataset=str(wikitext / "test.txt"), seq_len=32, eval_seq_len=32, eval_max_windows=4,
        finetune_samples=16, val_samples=4, batch_size=4, num_epochs=2, learning_rate=1e-2, log_every_n_steps=1,
        precision="32-true", eval_precision="32-true",  # exact comparisons; auto is bf16 on CPUs with AVX512-BF16
    )
    return FinetuneConfig.from_flat(values | overrides)


def mean_loss(model: torch.nn.Module, examples: list[dict[str, torch.Tensor]]) -> float:
    with torch.no_grad():
        total, count = masked_lm_loss(model.eval(), collate(examples, 0))
    return float(total / count)


def test_lora_trains_adapters_only_lowers_loss_and_merges_exactly(tmp_path: Path, pruned_checkpoint: Path,
                                                                    wikitext: Path) -> None:
    recipe = FinetuneRecipe(settings(pruned_checkpoint, tmp_path / "ft", wikitext))
    recipe.setup()
    try:
        assert recipe.model is not None
        loss_before = mean_loss(recipe.model, recipe.train_examples)
        linears = {n for n, m in recipe.model.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LORA_TARGETS}
        peft_model = recipe.trainable_model()
        trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
        adapted = {n.split(".lora_")[0].removeprefix("base_model.model.") for n in trainable}
        assert adapted == linears  # every surviving projection, and only those
        assert not any(n.startswith("model.layers.1.self_attn") for n in adapted)  # the removed block has none
        assert any(n.startswith("model.layers.1.mlp") for n in adapted)

        module = recipe.train(peft_model)
        assert {n for n, p in module.model.named_parameters() if p.requires_grad} == trainable
        assert mean_loss(peft_model, recipe.train_examples) < loss_before - 0.05  # training lowered the loss
        checkpoint = torch.load(recipe.best.best_model_path, weights_only=True)["state_dict"]
        assert {k.removeprefix("model.") for k in checkpoint} == trainable  # best-epoch checkpoint: adapters only

        ids = recipe.train_examples[0]["input_ids"][None]
        with torch.no_grad():
            unmerged = peft_model.eval()(input_ids=ids).logits
            merged = recipe.save(peft_model)
            merged_logits = merged.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged_logits, unmerged, rtol=1e-5, atol=1e-5)
        assert not any("lora" in n for n, _ in merged.named_parameters())

        saved = tmp_path / "ft" / "model"
        with torch.no_grad():
            reloaded = load_pruned(saved)(input_ids=ids).logits
            remote = AutoModelForCausalLM.from_pretrained(saved, trust_remote_code=True).eval()(input_ids=ids).logits
        assert torch.equal(reloaded, merged_logits) and torch.equal(remote, merged_logits)
        assert json.loads((saved / "config.json").read_text())["recovery"]["finetune_method"] == "lora"
    finally:
        recipe.cleanup()


def test_full_finetune_updates_every_parameter(tmp_path: Path, pruned_checkpoint: Path, wikitext: Path) -> None:
    before = {n: p.detach().clone() for n, p in load_pruned(pruned_checkpoint).named_parameters()}
    result = finetune(settings(pruned_checkpoint, tmp_path / "full", wikitext, finetune_method="full", num_epochs=1,
                               learning_rate=1e-3, save_model=False, test_before_finetune=False))
    assert result.model is not None
    after = dict(result.model.named_parameters())
    assert after.keys() == before.keys()
    assert all(p.requires_grad for p in after.values())
    unchanged = [n for n, p in after.items() if torch.equal(p.detach(), before[n])]
    assert not unchanged
    assert result.evaluation["parameters"]["trainable"] == result.evaluation["parameters"]["total"]
    assert not (tmp_path / "full" / "model").exists()


def test_bf16_training_keeps_the_source_dtype(tmp_path: Path, pruned_checkpoint: Path, wikitext: Path) -> None:
    """Training in bf16 weights (what auto picks on a native-bf16 CPU) saves the float32 source as float32."""
    result = finetune(settings(pruned_checkpoint, tmp_path / "bf16", wikitext, precision="bf16-true", num_epochs=1,
                               finetune_samples=4, val_samples=2, test_before_finetune=False, test_after_finetune=False))
    assert result.evaluation["precision"] == "bf16-true"
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model" / "model.safetensors").values()} == {torch.float32}


def test_run_writes_results_curve_and_adapter_that_reloads(tmp_path: Path, pruned_checkpoint: Path,
                                                             wikitext: Path) -> None:
    from peft import PeftModel

    out = tmp_path / "adapter-run"
    result = finetune(settings(pruned_checkpoint, out, wikitext, save_adapter_only=True, num_epochs=1))
    ev = json.loads((out / "evaluation_results.json").read_text())
    assert ev["ppl_before"] > 0 and ev["ppl_after"] > 0 and ev["eval_windows"] == 4
    assert ev["optimizer_steps"] == 4 and ev["train_examples"] == 16 and ev["val_examples"] == 4
    assert (out / "visualization" / "finetune_loss.png").stat().st_size > 1000
    assert (out / "logs" / "csv" / "metrics.csv").is_file()
    curve = (out / "analysis" / "finetune_loss.csv").read_text().splitlines()
    assert curve[0].startswith("step,") and len(curve) == 1 + 4  # a row per optimizer step (step 0 = before)
    assert not (out / "model").exists()

    ids = torch.arange(3, 40)[None]
    assert result.model is not None
    with torch.no_grad():
        trained = result.model.eval()(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(load_pruned(pruned_checkpoint), out / "adapter").eval()(input_ids=ids)
    torch.testing.assert_close(reloaded.logits, trained, rtol=0, atol=0)


def test_instruction_data_puts_the_loss_on_the_response_only(tmp_path: Path, tiny_checkpoint: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    records = [{"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"numbers {i}",
                "output": f"The sum is {2 * i + 1}."} for i in range(10)]
    data = tmp_path / "alpaca.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    train, val = load_examples(str(data), "auto", tokenizer, 96, None, 2, seed=0, prompt_format="plain")
    assert len(train) == 8 and len(val) == 2
    from gp_lightning.finetune.data import Instruction

    for fmt in ("chat", "plain"):
        record = Instruction("Add 2 and 3.", "numbers 2", "The sum is 5.")
        example = instruction_example(record, tokenizer, fmt, 96)
        assert example is not None
        prompt = render_prompt(record, tokenizer, fmt)
        response = tokenizer(record.output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert example["input_ids"].tolist() == prompt + response
        assert (example["labels"][: len(prompt)] == IGNORE).all()
        assert example["labels"][len(prompt):].tolist() == response
    # the masked loss equals cross-entropy over response tokens alone (padding ignored too)
    model = tiny_model("llama", vocab=len(tokenizer))
    batch = collate(train[:3], pad_id=0)
    total, count = masked_lm_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, n = torch.zeros(()), 0
    for row in range(3):
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][row, t + 1])
            if target != IGNORE:
                expected = expected + F.cross_entropy(logits[row, t][None], torch.tensor([target]))
                n += 1
    assert int(count) == n == sum(int((e["labels"] != IGNORE).sum()) for e in train[:3])
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


def test_bad_input_names_the_fix(tmp_path: Path, pruned_checkpoint: Path, wikitext: Path) -> None:
    with pytest.raises(DataError, match="finetune_samples"):
        FinetuneRecipe(settings(pruned_checkpoint, tmp_path / "a", wikitext, finetune_samples=10**6)).setup()
    with pytest.raises(ConfigError, match="match no linear layer"):
        finetune(settings(pruned_checkpoint, tmp_path / "b", wikitext, lora_target_modules=["c_attn"],
                          test_before_finetune=False))
    with pytest.raises(ConfigError, match="GPUs only"):
        FinetuneRecipe(settings(pruned_checkpoint, tmp_path / "c", wikitext, strategy="deepspeed",
                                accelerator="cpu")).setup()
    with pytest.raises(ConfigError, match="save_adapter_only"):
        FinetuneConfig.from_flat(finetune_method="full", save_adapter_only=True)
    bad = tmp_path / "ft.yaml"
    bad.write_text("lora_rank: 8\n")
    assert prune_main(["--finetune", "--finetune_config", str(bad), "--output", str(tmp_path / "p")]) == 2
    assert prune_main(["--finetune_config", str(bad), "--output", str(tmp_path / "p")]) == 2
    assert not (tmp_path / "p").exists()


def test_train_cli_and_prune_finetune(tmp_path: Path, pruned_checkpoint: Path, tiny_checkpoint: Path,
                                      wikitext: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-ft"
    args = ["--config", str(ROOT / "configs" / "finetune-lora.yaml"), "--model", str(pruned_checkpoint),
            "--output", str(out), "--dataset", str(wikitext / "valid.txt"), "--eval_dataset",
            str(wikitext / "test.txt"), "--seq_len", "32", "--eval_seq_len", "32", "--eval_max_windows", "4",
            "--finetune_samples", "8", "--val_samples", "2", "--warmup_steps", "0"]
    assert train_main(args) == 0
    ev = json.loads((out / "evaluation_results.json").read_text())
    assert {"ppl_before", "ppl_after"} <= ev.keys() and ev["optimizer_steps"] == 2
    assert load_pruned(out / "model") is not None
    # a second run into the same directory is refused (nothing overwritten), --overwrite replaces it
    capsys.readouterr()
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err

    run = tmp_path / "prune-ft"
    small = tmp_path / "small-lora.yaml"
    small.write_text("finetune_method: lora\nfinetune_samples: 8\nval_samples: 2\nlearning_rate: 0.01\n")
    code = prune_main(["--model", str(tiny_checkpoint), "--pruning_ratio", "0.002", "--num_samples", "4",
                       "--seq_len", "32", "--dataset", str(wikitext / "valid.txt"), "--eval_dataset",
                       str(wikitext / "test.txt"), "--eval_seq_len", "32", "--eval_max_windows", "4", "--output",
                       str(run), "--finetune", "--finetune_config", str(small)])
    assert code == 0
    pruned = json.loads((run / "evaluation_results.json").read_text())
    tuned = json.loads((run / "finetune" / "evaluation_results.json").read_text())
    # same held-out windows: the fine-tune starts from the pruned model's measured perplexity
    assert tuned["ppl_before"] == pruned["ppl_after"] and tuned["eval_windows"] == pruned["eval_windows"] == 4
    assert pruned["finetune"]["ppl_after"] == tuned["ppl_after"] and tuned["train_examples"] == 8
    assert (run / "model").is_dir() and (run / "finetune" / "model").is_dir()
    assert "Fine-tuned (lora" in capsys.readouterr().out


def test_kd_loss_is_the_temperature_scaled_kl_of_the_counted_positions() -> None:
    from gp_lightning.finetune.distill import kd_loss_sum, mixed_loss

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 11, generator=g), torch.randn(2, 6, 11, generator=g)
    labels = torch.randint(0, 11, (2, 6), generator=g)
    labels[0, :3] = IGNORE  # a prompt: positions predicting it do not count
    total, count = kd_loss_sum(student, teacher, labels, temperature=2.0)
    expected, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            if labels[b, t + 1] != IGNORE:
                p = torch.softmax(teacher[b, t] / 2, -1)
                expected += float((p * (p.log() - torch.log_softmax(student[b, t] / 2, -1))).sum()) * 4
                n += 1
    assert int(count) == n and float(total) == pytest.approx(expected, rel=1e-5)
    lm, kd = torch.tensor(2.0), torch.tensor(4.0)
    assert float(mixed_loss(lm, kd, "kd+lm", 0.25)) == pytest.approx(2.5)
    assert float(mixed_loss(lm, kd, "kd", 0.25)) == 4.0 and float(mixed_loss(lm, None, "lm", 0.25)) == 2.0


def test_distillation_trains_toward_the_teacher_and_refuses_another_vocabulary(
        tmp_path: Path, pruned_checkpoint: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    from gp_lightning.finetune.distill import kd_loss_sum
    from gp_lightning.finetune.module import batch_logits

    recipe = FinetuneRecipe(settings(pruned_checkpoint, tmp_path / "kd", wikitext, finetune_loss="kd",
                                     teacher=str(tiny_checkpoint), num_epochs=2, save_model=False,
                                     finetune_method="full", learning_rate=3e-4))
    recipe.setup()
    try:
        batch = collate(recipe.train_examples, 0)

        def kl(model: torch.nn.Module) -> float:
            with torch.no_grad():
                total, count = kd_loss_sum(batch_logits(model.eval(), batch), batch_logits(recipe.teacher, batch),
                                           batch["labels"])
            return float(total / count)

        before = kl(recipe.model)
        module = recipe.train(recipe.trainable_model())
        assert kl(module.model) < 0.7 * before  # the student moved toward the dense model's distribution
    finally:
        recipe.cleanup()
    metrics = pd.read_csv(tmp_path / "kd" / "logs" / "csv" / "metrics.csv")
    assert metrics["train_kd_loss_step"].notna().sum() == 8
    other = tmp_path / "other-vocab"
    tiny_model("llama", vocab=50).save_pretrained(other)
    with pytest.raises(ConfigError, match="vocabulary"):
        finetune(settings(pruned_checkpoint, tmp_path / "kd2", wikitext, finetune_loss="kd", teacher=str(other)))
    with pytest.raises(ConfigError, match="teacher"):
        settings(pruned_checkpoint, tmp_path / "kd3", wikitext, finetune_loss="kd")


@pytest.mark.parametrize("precision,dtype", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16)])
def test_the_teacher_runs_in_its_own_precision_inside_a_bf16_training_step(precision: str, dtype: torch.dtype) -> None:
    """Lightning's bf16-mixed wraps the training step in bf16 autocast; a 32-true teacher must still be float32."""
    from gp_lightning.finetune.module import FinetuneModule

    teacher = tiny_model("llama", layers=2).eval()
    module = FinetuneModule(tiny_model("llama", layers=2), teacher=teacher, teacher_precision=precision)
    batch = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = module.teacher_logits(batch)
    assert logits.dtype == dtype
    if precision == "32-true":
        with torch.no_grad():
            torch.testing.assert_close(logits, teacher(input_ids=batch["input_ids"]).logits)
