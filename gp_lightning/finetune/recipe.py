"""The recovery fine-tuning recipe: setup -> evaluate before -> train -> evaluate after -> save -> report.

:class:`FinetuneRecipe` is what ``train.py`` and ``prune.py --finetune`` run. Held-out perplexity
is measured on ``eval_dataset`` (never the training text); the best epoch is chosen by the
validation loss of examples held out of the training data. Only rank 0 evaluates and writes.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
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
from gp_lightning.data.sources import load_text
from gp_lightning.data.windows import evaluation_windows, tokenize
from gp_lightning.evaluation.perplexity import measure_perplexity
from gp_lightning.export.checkpoint import save_checkpoint
from gp_lightning.finetune.config import FinetuneConfig
from gp_lightning.finetune.data import FinetuneData, load_examples, pad_token_id
from gp_lightning.finetune.lora import add_lora, merged, trainable_parameters
from gp_lightning.finetune.module import FinetuneModule
from gp_lightning.model.source import load_model, resolve
from gp_lightning.runtime.errors import ConfigError
from gp_lightning.runtime.io import check_run_dir, open_run_log, staged_directory, write_csv, write_json
from gp_lightning.runtime.launch import resolve_launch
from gp_lightning.runtime.precision import load_dtype
from gp_lightning.runtime.precision import resolve as resolve_precision
from gp_lightning.runtime.ranks import global_rank

log = logging.getLogger("gp_lightning")


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced (also on disk in ``run_dir``)."""

    run_dir: Path
    model: torch.nn.Module | None  # merged (or, with save_adapter_only, the peft model); None on ranks > 0
    evaluation: dict[str, Any] = field(default_factory=dict)


def training_strategy(cfg: FinetuneConfig) -> tuple[Any, int, bool]:
    """(Lightning strategy, devices, shards parameters) for ``cfg.strategy``."""
    if cfg.strategy == "deepspeed":
        if cfg.accelerator == "cpu" or (cfg.accelerator == "auto" and not torch.cuda.is_available()):
            raise ConfigError("strategy: deepspeed fine-tunes on GPUs only (Lightning's DeepSpeed strategy refuses "
                              "CPU); use strategy: fsdp or ddp here.")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        devices = resolve_launch("ddp", cfg.accelerator, cfg.devices, cfg.num_nodes).devices
        return DeepSpeedStrategy(stage=3), devices, False
    launch = resolve_launch(cfg.strategy, cfg.accelerator, cfg.devices, cfg.num_nodes, full_checkpoints=True)
    return launch.strategy, launch.devices, launch.shards_parameters


class FinetuneRecipe:
    """One recovery fine-tune. ``model``/``tokenizer`` may be handed over in memory (prune.py --finetune)."""

    def __init__(self, config: FinetuneConfig, model: torch.nn.Module | None = None,
                 tokenizer: object | None = None) -> None:
        self.cfg = config
        self.rank = global_rank()
        self.run_dir = Path(config.output)
        self.model = model
        self.tokenizer = tokenizer
        self.timings: dict[str, float] = {}
        self.evaluation: dict[str, Any] = {}
        self._log_handler: logging.Handler = logging.NullHandler()

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if self.rank == 0:
            check_run_dir(self.run_dir, cfg.overwrite)
        self.precision = resolve_precision(cfg.precision, cfg.accelerator)
        self.eval_precision = resolve_precision(cfg.eval_precision, cfg.accelerator)
        self.strategy, self.devices, self.shard = training_strategy(cfg)
        L.seed_everything(cfg.seed, verbose=False)
        start = time.perf_counter()
        if self.model is None:
            self.model, self.tokenizer = load_model(
                cfg.model, dtype=load_dtype(self.precision), tokenizer_source=cfg.tokenizer,
                trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir)
        self.timings["load_model_s"] = time.perf_counter() - start
        self.train_examples, self.val_examples = load_examples(
            cfg.dataset, cfg.data_format, self.tokenizer, cfg.seq_len, cfg.finetune_samples, cfg.val_samples,
            cfg.seed, cfg.prompt_format)
        self.eval_windows = None
        if self.rank == 0 and (cfg.test_before_finetune or cfg.test_after_finetune):
            tokens = tokenize(load_text(cfg.eval_dataset, "evaluation"), self.tokenizer)
            self.eval_windows = evaluation_windows(tokens, cfg.eval_seq_len, cfg.eval_max_windows)
        if self.rank == 0:
            self._open_run_dir()

    def _open_run_dir(self) -> None:
        self._log_handler = open_run_log(self.run_dir, log, self.cfg.to_dict())
        log.info("gp-lightning %s fine-tune (%s): model=%s, %d training / %d validation examples", __version__,
                 self.cfg.finetune_method, self.cfg.model, len(self.train_examples), len(self.val_examples))

    # -- steps ---------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, key: str) -> float:
        assert self.eval_windows is not None
        return measure_perplexity(model, self.eval_windows, self.cfg.eval_batch_size, self.eval_precision, key,
                                  self.evaluation, self.timings)

    def trainable_model(self) -> torch.nn.Module:
        """LoRA: the peft model (only adapters require grad). Full: the model, everything requiring grad."""
        cfg = self.cfg
        assert self.model is not None
        if cfg.finetune_method == "lora":
            for param in self.model.parameters():
                param.requires_grad_(False)
            model = add_lora(self.model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
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

    def train(self, model: torch.nn.Module) -> FinetuneModule:
        cfg = self.cfg
        module = FinetuneModule(model, cfg.learning_rate, cfg.weight_decay, cfg.warmup_steps, cfg.lr_scheduler,
                                shard=self.shard, activation_checkpointing=cfg.activation_checkpointing,
                                adapter_checkpoints=cfg.finetune_method == "lora")
        self.best = ModelCheckpoint(dirpath=str(self.run_dir / "checkpoints"), filename="best-epoch{epoch}",
                                    monitor="val_loss", mode="min", save_top_k=1, save_weights_only=True,
                                    auto_insert_metric_name=False)
        trainer = L.Trainer(
            accelerator=cfg.accelerator, devices=self.devices, num_nodes=cfg.num_nodes, strategy=self.strategy,
            precision=self.precision, max_epochs=cfg.num_epochs, accumulate_grad_batches=cfg.gradient_accumulation_steps,
            gradient_clip_val=cfg.max_grad_norm or None, logger=self.loggers(),
            callbacks=[self.best, LearningRateMonitor(logging_interval="step")],
            log_every_n_steps=cfg.log_every_n_steps, num_sanity_val_steps=0, enable_model_summary=False,
            inference_mode=False,  # validate() before fit() would leave the metric state as inference tensors
            use_distributed_sampler=False,  # FinetuneData shards itself (same order for any world size)
            default_root_dir=str(self.run_dir),
        )
        data = FinetuneData(self.train_examples, self.val_examples, cfg.batch_size, pad_token_id(self.tokenizer),
                            cfg.seed)
        start = time.perf_counter()
        trainer.validate(module, datamodule=data, verbose=False)  # the validation loss before any step
        self.initial_val_loss = float(trainer.callback_metrics["val_loss"])
        trainer.fit(module, datamodule=data)
        self.timings["train_s"] = time.perf_counter() - start
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
        cfg = self.cfg
        self.model, _ = load_model(cfg.model, dtype=load_dtype(self.precision), tokenizer_source=cfg.tokenizer,
                                   trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir)
        whole = self.trainable_model()
        whole.load_state_dict(state)
        module.model = whole

    def save(self, model: torch.nn.Module) -> torch.nn.Module:
        """Adapter alone (peft format), or the merged model in the input's checkpoint format."""
        cfg = self.cfg
        start = time.perf_counter()
        if cfg.save_adapter_only:
            source = Path(resolve(cfg.model, cfg.cache_dir)).expanduser()
            model.peft_config["default"].base_model_name_or_path = str(source.resolve()) if source.exists() else cfg.model
            with staged_directory(self.run_dir / "adapter") as staging:
                model.save_pretrained(staging)  # type: ignore[operator]
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(staging)  # type: ignore[attr-defined]
            out = model
        else:
            out = merged(model)
            out.config.recovery = self.provenance()
            if cfg.save_model:
                save_checkpoint(out, self.tokenizer, self.run_dir / "model")
        self.timings["save_s"] = time.perf_counter() - start
        return out

    def provenance(self) -> dict[str, Any]:
        cfg = self.cfg
        keys = ("finetune_method", "dataset", "num_epochs", "learning_rate", "lora_r", "lora_alpha")
        return {**{k: getattr(cfg, k) for k in keys}, "steps": self.steps, "gp_lightning_version": __version__}

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
        self.setup()
        try:
            cfg = self.cfg
            if cfg.test_before_finetune and self.eval_windows is not None:
                assert self.model is not None
                self.evaluate(self.model, "before")
            module = self.train(self.trainable_model())
            if self.rank != 0:
                return FinetuneResult(self.run_dir, None, {"rank": self.rank})
            out = self.save(module.model)
            if cfg.test_after_finetune:
                self.evaluate(out, "after")
            self.report()
            results = self.results()
            write_json(self.run_dir / "evaluation_results.json", results)
            log.info("done: %s", self.run_dir)
            return FinetuneResult(self.run_dir, out, results)
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Detach this run's log file (the steps can also be driven one by one: setup, train, save, cleanup)."""
        log.removeHandler(self._log_handler)
        self._log_handler.close()

    def results(self) -> dict[str, Any]:
        curve = getattr(self, "curve", pd.DataFrame())
        train = curve["train_loss"].dropna() if "train_loss" in curve else pd.Series(dtype=float)
        val = curve["val_loss"].dropna() if "val_loss" in curve else pd.Series(dtype=float)
        before, after = self.evaluation.get("ppl_before"), self.evaluation.get("ppl_after")
        return {
            "finetune_method": self.cfg.finetune_method,
            **self.evaluation,
            "ppl_change": None if before is None or after is None else after / before - 1,
            "eval_dataset": self.cfg.eval_dataset,
            "eval_seq_len": self.cfg.eval_seq_len,
            "eval_windows": 0 if self.eval_windows is None else int(self.eval_windows.shape[0]),
            "train_examples": len(self.train_examples),
            "val_examples": len(self.val_examples),
            "optimizer_steps": self.steps,
            "train_loss_first": float(train.iloc[0]) if len(train) else None,
            "train_loss_last": float(train.iloc[-1]) if len(train) else None,
            "val_loss_initial": self.initial_val_loss,
            "val_loss_by_epoch": [float(v) for v in val.iloc[1:]],
            "val_ppl_initial": math.exp(self.initial_val_loss),
            "best_checkpoint": self.best.best_model_path or None,
            "saved": str(self.run_dir / ("adapter" if self.cfg.save_adapter_only else "model"))
            if (self.cfg.save_model or self.cfg.save_adapter_only) else None,
            "precision": self.precision,
            "timings_s": self.timings,
        }


def finetune(config: FinetuneConfig | None = None, **overrides: Any) -> FinetuneResult:
    """Fine-tune in one call: ``finetune(model="runs/x/model", output="runs/x-ft", finetune_method="lora")``."""
    if config is None:
        config = FinetuneConfig(**overrides)
    elif overrides:
        config = FinetuneConfig(**{**config.to_dict(), **overrides})
    return FinetuneRecipe(config).run()
