"""The recovery fine-tuning recipe: setup -> evaluate before -> train -> evaluate after -> save -> report.

:class:`FinetuneRecipe` is what ``train.py`` and ``prune.py --finetune`` run. Held-out perplexity
is measured on ``eval_dataset`` (never the training text); the best epoch is chosen by the
validation loss of examples held out of the training data. Only rank 0 evaluates and writes.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from gp_lightning import __version__
from gp_lightning.analysis.plots import finetune_loss_figure, save_png
from gp_lightning.data.sources import check_source
from gp_lightning.evaluation.evaluator import Evaluator
from gp_lightning.evaluation.zero_shot import ZeroShot
from gp_lightning.export.checkpoint import save_checkpoint
from gp_lightning.finetune.config import FinetuneConfig
from gp_lightning.finetune.data import FinetuneData, load_examples, pad_token_id
from gp_lightning.finetune.lora import add_lora, merged, trainable_parameters
from gp_lightning.finetune.module import FinetuneModule
from gp_lightning.model.config import ModelConfig
from gp_lightning.model.layout import check_sequence_lengths
from gp_lightning.model.source import resolve
from gp_lightning.runtime.config import DistributedConfig
from gp_lightning.runtime.errors import ConfigError
from gp_lightning.runtime.io import staged_directory, write_csv, write_json
from gp_lightning.runtime.launch import resolve_launch
from gp_lightning.runtime.precision import load_dtype
from gp_lightning.runtime.recipe import Recipe
from gp_lightning.runtime.run_manifest import require_complete

log = logging.getLogger("gp_lightning")


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced (also on disk in ``run_dir``)."""

    run_dir: Path
    model: torch.nn.Module | None  # merged (or, with save_adapter_only, the peft model); None on ranks > 0
    evaluation: dict[str, Any] = field(default_factory=dict)


def training_strategy(distributed: DistributedConfig) -> tuple[Any, int, bool]:
    """(Lightning strategy, devices, shards parameters) for ``distributed.strategy``."""
    d = distributed
    if d.strategy == "deepspeed":
        if d.accelerator == "cpu" or (d.accelerator == "auto" and not torch.cuda.is_available()):
            raise ConfigError("strategy: deepspeed fine-tunes on GPUs only (Lightning's DeepSpeed strategy refuses "
                              "CPU); use strategy: fsdp or ddp here.")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        devices = resolve_launch("ddp", d.accelerator, d.devices, d.num_nodes).devices
        return DeepSpeedStrategy(stage=3), devices, False
    launch = resolve_launch(d.strategy, d.accelerator, d.devices, d.num_nodes, full_checkpoints=True)
    return launch.strategy, launch.devices, launch.shards_parameters


class FinetuneRecipe(Recipe):
    """One recovery fine-tune. ``model``/``tokenizer`` may be handed over in memory (prune.py --finetune);
    ``parent_run``: the prune run this fine-tune is a step of, whose own (still running) model it may read."""

    def __init__(self, config: FinetuneConfig, model: torch.nn.Module | None = None,
                 tokenizer: object | None = None, parent_run: Path | None = None) -> None:
        super().__init__(config.run, config.distributed, config.evaluation.eval_precision)
        self.cfg = config
        self.parent_run = parent_run
        self.model = model
        self.tokenizer = tokenizer
        self.evaluator = Evaluator(None, config.evaluation.eval_batch_size, "32-true", timings=self.timings)
        self.steps = 0
        self.initial_val_loss = float("nan")
        self.curve = pd.DataFrame()
        self.teacher: torch.nn.Module | None = None
        self.zero_shot: ZeroShot | None = None  # eval_tasks, checked in setup
        #: the dtype the merged model is saved in: the handed-over model's, else the source checkpoint's
        self.source_dtype = None if model is None else next(model.parameters()).dtype

    @property
    def evaluation(self) -> dict[str, Any]:
        """What has been measured so far (perplexities, parameter counts)."""
        return self.evaluator.results

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        sources = [cfg.distillation.teacher, None if self.model is not None else cfg.source.model]
        for source in filter(None, sources):  # prune.py --finetune reads its own run's model/
            require_complete(source, "train.py", own_output=self.parent_run)
        self.zero_shot = ZeroShot.of(cfg.evaluation)  # tasks known, data loaded: before the run directory is touched
        self.start(cfg.run.overwrite, cfg.to_dict())
        self.strategy, self.devices, self.shard = training_strategy(cfg.distributed)
        e = cfg.evaluation
        needed = self.rank == 0 and (e.test_before_finetune or e.test_after_finetune)
        check_source(cfg.data.dataset, "calibration")  # a missing file or hub stops here, not after the load
        if needed:
            check_source(e.eval_dataset, "evaluation")
        with self.timed("load_model_s"):
            if self.model is None:
                self.model, self.tokenizer = cfg.source.load(load_dtype(self.precision))
            self.teacher = self.load_teacher()
        d = cfg.data
        check_sequence_lengths(self.model, {"seq_len": d.seq_len, "eval_seq_len": cfg.evaluation.eval_seq_len})
        self.train_examples, self.val_examples = load_examples(
            d.dataset, d.data_format, self.tokenizer, d.seq_len, d.finetune_samples, d.val_samples, cfg.run.seed,
            d.prompt_format, d.text_encoding)
        known = dict(self.evaluator.results)  # a perplexity handed over by prune.py --finetune
        self.evaluator = Evaluator.on(e, self.tokenizer, self.eval_precision, needed, self.timings, d.text_encoding)
        self.evaluator.results.update(known)
        self.open_log(cfg.to_dict())
        log.info("gp-lightning %s fine-tune (%s): model=%s, %d training / %d validation examples, precision=%s (%s)",
                 __version__, cfg.adapter.finetune_method, cfg.source.model, len(self.train_examples),
                 len(self.val_examples), self.precision, self.precision_reason)

    def load_teacher(self) -> torch.nn.Module | None:
        """The dense model to distil from (kd, kd+lm), frozen, in the evaluation precision."""
        d, source = self.cfg.distillation, self.cfg.source
        if d.finetune_loss == "lm":
            return None
        assert d.teacher is not None and self.model is not None
        teacher, _ = ModelConfig(d.teacher, None, source.trust_remote_code, source.cache_dir).load(
            load_dtype(self.eval_precision), with_tokenizer=False)
        student_vocab = self.model.get_input_embeddings().num_embeddings
        if teacher.get_input_embeddings().num_embeddings != student_vocab:
            raise ConfigError(f"teacher {d.teacher} has a vocabulary of {teacher.get_input_embeddings().num_embeddings} "
                              f"tokens, the model {student_vocab}: distillation needs the model the student was pruned "
                              "from (the same tokenizer).")
        for param in teacher.parameters():
            param.requires_grad_(False)
        return teacher.eval()

    # -- steps ---------------------------------------------------------------------------------
    def trainable_model(self) -> torch.nn.Module:
        """LoRA: the peft model (only adapters require grad). Full: the model, everything requiring grad."""
        a = self.cfg.adapter
        assert self.model is not None
        if a.finetune_method == "lora":
            for param in self.model.parameters():
                param.requires_grad_(False)
            model = add_lora(self.model, a.lora_target_modules, a.lora_r, a.lora_alpha, a.lora_dropout)
        else:
            model = self.model
            for param in model.parameters():
                param.requires_grad_(True)
        self.evaluation["parameters"] = trainable_parameters(model)
        log.info("trainable parameters: %s", self.evaluation["parameters"])
        return model

    def loggers(self) -> list[Logger]:
        loggers: list[Logger] = [CSVLogger(save_dir=str(self.run_dir), name="logs", version="csv")]
        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            loggers.append(TensorBoardLogger(save_dir=str(self.run_dir), name="logs", version="tensorboard"))
        return loggers

    def trainer(self) -> L.Trainer:
        cfg, t = self.cfg, self.cfg.training
        self.best = ModelCheckpoint(dirpath=str(self.run_dir / "checkpoints"), filename="best-epoch{epoch}",
                                    monitor="val_loss", mode="min", save_top_k=1, save_weights_only=True,
                                    auto_insert_metric_name=False)
        return L.Trainer(
            accelerator=cfg.distributed.accelerator, devices=self.devices, num_nodes=cfg.distributed.num_nodes,
            strategy=self.strategy, precision=self.precision, max_epochs=t.num_epochs,
            accumulate_grad_batches=t.gradient_accumulation_steps, gradient_clip_val=t.max_grad_norm or None,
            logger=self.loggers(), callbacks=[self.best, LearningRateMonitor(logging_interval="step")],
            log_every_n_steps=t.log_every_n_steps, num_sanity_val_steps=0, enable_model_summary=False,
            inference_mode=False,  # validate() before fit() would leave the metric state as inference tensors
            use_distributed_sampler=False,  # FinetuneData shards itself (same order for any world size)
            default_root_dir=str(self.run_dir),
        )

    def train(self, model: torch.nn.Module) -> FinetuneModule:
        cfg, t = self.cfg, self.cfg.training
        module = FinetuneModule(model, t, shard=self.shard,
                                activation_checkpointing=cfg.distributed.activation_checkpointing,
                                adapter_checkpoints=cfg.adapter.finetune_method == "lora",
                                distillation=cfg.distillation, teacher=self.teacher,
                                teacher_precision=self.eval_precision)
        trainer = self.trainer()
        data = FinetuneData(self.train_examples, self.val_examples, cfg.data.batch_size, pad_token_id(self.tokenizer),
                            cfg.run.seed)
        with self.timed("train_s"):
            trainer.validate(module, datamodule=data, verbose=False)  # the validation loss before any step
            self.initial_val_loss = float(trainer.callback_metrics["val_loss"])
            trainer.fit(module, datamodule=data)
        self.steps = int(trainer.global_step)
        if self.shard:
            self.gather(module)
        if self.rank == 0 and self.best.best_model_path:  # rank 0 alone evaluates and saves
            module.load_trained(self.best.best_model_path)
            log.info("restored the best epoch: %s (val_loss %.4f)", self.best.best_model_path,
                     float(self.best.best_model_score))
        return module

    def gather(self, module: FinetuneModule) -> None:
        """FSDP: collect the trained model whole on rank 0, into a fresh unsharded copy of the input model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return
        self.model, _ = self.cfg.source.load(load_dtype(self.precision))
        whole = self.trainable_model()
        whole.load_state_dict(state)
        module.model = whole

    def save(self, model: torch.nn.Module) -> torch.nn.Module:
        """Adapter alone (peft format), or the merged model in the input's checkpoint format and dtype."""
        cfg = self.cfg
        with self.timed("save_s"):
            if cfg.run.save_adapter_only:
                source = Path(resolve(cfg.source.model, cfg.source.cache_dir)).expanduser()
                base = str(source.resolve()) if source.exists() else cfg.source.model
                model.peft_config["default"].base_model_name_or_path = base
                with staged_directory(self.run_dir / "adapter") as staging:
                    model.save_pretrained(staging)  # type: ignore[operator]
                    if self.tokenizer is not None:
                        self.tokenizer.save_pretrained(staging)  # type: ignore[attr-defined]
                return model
            out = merged(model).to(self.source_dtype or cfg.source.storage_dtype())  # as pruning keeps it
            out.config.recovery = self.provenance()
            if cfg.run.save_model:
                save_checkpoint(out, self.tokenizer, self.run_dir / "model")
            return out

    def provenance(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"finetune_method": cfg.adapter.finetune_method, "finetune_loss": cfg.distillation.finetune_loss,
                "dataset": cfg.data.dataset,
                "num_epochs": cfg.training.num_epochs, "learning_rate": cfg.training.learning_rate,
                "lora_r": cfg.adapter.lora_r, "lora_alpha": cfg.adapter.lora_alpha, "steps": self.steps,
                "gp_lightning_version": __version__}

    def report(self) -> None:
        """Loss curve (CSV + PNG) from the CSV logger's metrics."""
        metrics = self.run_dir / "logs" / "csv" / "metrics.csv"
        if not metrics.is_file():
            return
        frame = pd.read_csv(metrics)
        curve = pd.DataFrame({"step": frame["step"], "epoch": frame.get("epoch")})
        for column in ("train_loss_step", "val_loss", "lr-AdamW"):
            if column in frame:
                curve[column.replace("_step", "").replace("lr-AdamW", "learning_rate")] = frame[column]
        curve = curve.groupby("step", as_index=False).first()
        first = pd.DataFrame([{"step": 0, "epoch": 0, "val_loss": self.initial_val_loss}])
        curve = pd.concat([first, curve], ignore_index=True).groupby("step", as_index=False).first()
        write_csv(self.run_dir / "analysis" / "finetune_loss.csv", curve)
        save_png(finetune_loss_figure(curve), self.run_dir / "visualization" / "finetune_loss.png")
        self.curve = curve

    def run(self) -> FinetuneResult:
        try:
            self.setup()  # inside: a run stopped by bad input releases the run directory's lock too
            cfg = self.cfg
            if cfg.evaluation.test_before_finetune and self.evaluator.windows is not None:
                assert self.model is not None
                self.evaluator.measure(self.model, "before")
            module = self.train(self.trainable_model())
            if self.rank != 0:
                return FinetuneResult(self.run_dir, None, {"rank": self.rank})
            out = self.save(module.model)
            if cfg.evaluation.test_after_finetune:
                self.evaluator.measure(out, "after")
            if self.zero_shot is not None:  # rank 0 alone, as perplexity
                self.zero_shot.measure(out, self.tokenizer, self.eval_precision, self.run_dir, self.evaluation,
                                       self.timings)
            self.report()
            results = self.results()
            write_json(self.run_dir / "evaluation_results.json", results)
            log.info("done: %s", self.run_dir)
            self.finish()
            return FinetuneResult(self.run_dir, out, results)
        finally:
            self.cleanup()

    def results(self) -> dict[str, Any]:
        cfg, curve = self.cfg, self.curve
        train = curve["train_loss"].dropna() if "train_loss" in curve else pd.Series(dtype=float)
        val = curve["val_loss"].dropna() if "val_loss" in curve else pd.Series(dtype=float)
        before, after = self.evaluation.get("ppl_before"), self.evaluation.get("ppl_after")
        saved = cfg.run.save_model or cfg.run.save_adapter_only
        return {
            "finetune_method": cfg.adapter.finetune_method,
            "finetune_loss": cfg.distillation.finetune_loss,
            **self.evaluation,
            "ppl_change": None if before is None or after is None else after / before - 1,
            "eval_dataset": cfg.evaluation.eval_dataset,
            "eval_seq_len": cfg.evaluation.eval_seq_len,
            "eval_windows": self.evaluator.window_count,
            "train_examples": len(self.train_examples),
            "val_examples": len(self.val_examples),
            "optimizer_steps": self.steps,
            "train_loss_first": float(train.iloc[0]) if len(train) else None,
            "train_loss_last": float(train.iloc[-1]) if len(train) else None,
            "val_loss_initial": self.initial_val_loss,
            "val_loss_by_epoch": [float(v) for v in val.iloc[1:]],
            "val_ppl_initial": math.exp(self.initial_val_loss),
            "best_checkpoint": self.best.best_model_path or None,
            "saved": str(self.run_dir / ("adapter" if cfg.run.save_adapter_only else "model")) if saved else None,
            "precision": self.precision,
            "timings_s": self.timings,
        }


def finetune(config: FinetuneConfig | None = None, **keys: Any) -> FinetuneResult:
    """Fine-tune in one call: ``finetune(model="runs/x/model", output="runs/x-ft", finetune_method="lora")``."""
    return FinetuneRecipe(FinetuneConfig.given(config, **keys)).run()
