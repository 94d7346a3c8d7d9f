"""The prune recipe: data -> calibration -> table -> selection -> surgery -> evaluation -> export.

:class:`PruneRecipe` runs the steps in order and writes every artefact into the run directory;
:func:`oneshot` is the one-call entry for Python users. Everything that can be wrong with the input
(config, model, data, output directory) is checked in :meth:`PruneRecipe.setup`, before the run
directory is created, so a bad invocation leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch

from gp_lightning import __version__
from gp_lightning.analysis.diagnostics import diagnose
from gp_lightning.analysis.plots import gradient_analysis_figure, pruning_rates_figure, save_png
from gp_lightning.analysis.reports import describe_run, layer_summary_text, pruning_comparison
from gp_lightning.calibration.methods import needs_calibration_data
from gp_lightning.calibration.run import run_calibration
from gp_lightning.calibration.units import UnitImportance
from gp_lightning.config import PruneConfig
from gp_lightning.data.sources import check_source, load_text
from gp_lightning.data.windows import calibration_windows, evaluation_windows, tokenize
from gp_lightning.evaluation.perplexity import measure_perplexity
from gp_lightning.export.checkpoint import load_pruned, save_pruned
from gp_lightning.finetune.recipe import FinetuneRecipe, FinetuneResult
from gp_lightning.model.layout import ModelLayout, describe
from gp_lightning.model.sharded import meta_model
from gp_lightning.model.source import load_model, local_checkpoint_dir
from gp_lightning.runtime.errors import ConfigError
from gp_lightning.runtime.io import check_run_dir, open_run_log, write_csv, write_json, write_text
from gp_lightning.runtime.launch import launcher_warning
from gp_lightning.runtime.precision import load_dtype, resolve
from gp_lightning.runtime.ranks import broadcast_from_zero, distributed, global_rank, world_size
from gp_lightning.selection.greedy import check_budget, select
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.selection.result import Selection, layer_summary
from gp_lightning.surgery.in_memory import apply_plan
from gp_lightning.surgery.streamed import stream_prune
from gp_lightning.table.ablation import ablation_losses
from gp_lightning.table.build import BLOCK, build_table, ranked
from gp_lightning.table.saved import load_table
from gp_lightning.table.transforms import transform_table

log = logging.getLogger("gp_lightning")

#: What the pruning run's evaluation_results.json repeats of its fine-tune (the rest is in output/finetune).
FINETUNE_SUMMARY = ("finetune_method", "ppl_before", "ppl_after", "optimizer_steps", "train_loss_first",
                    "train_loss_last", "saved")


@dataclass
class RunResult:
    """What a run produced (everything is also on disk in ``run_dir``)."""

    run_dir: Path
    table: pd.DataFrame
    selection: Selection | None  # None with table_only
    pruned_model: torch.nn.Module | None  # with finetune: the same model, fine-tuned and merged
    evaluation: dict[str, Any] = field(default_factory=dict)
    finetuned: FinetuneResult | None = None  # with finetune


class PruneRecipe:
    """One global pruning run. Call :meth:`run`, or the steps one by one."""

    def __init__(self, config: PruneConfig) -> None:
        self.cfg = config
        self.rank = global_rank()
        self.run_dir = Path(config.output)
        self.timings: dict[str, float] = {}
        self.gradient_statistics: dict | None = None
        self.evaluation: dict[str, Any] = {}

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        if self.rank == 0:
            check_run_dir(self.run_dir, cfg.overwrite or cfg.resume)
        if cfg.finetune and not (cfg.save_model or cfg.streamed_surgery) and world_size() > 1:
            raise ConfigError("finetune in a distributed run starts every rank from the saved pruned model: set "
                              "save_model: true.")
        if cfg.finetune:  # fail before calibration, not after pruning
            settings = cfg.finetune_settings
            check_source(settings.dataset)
            check_source(settings.eval_dataset)
        warning = launcher_warning()
        if warning:
            warnings.warn(warning, stacklevel=2)
        self.precision = resolve(cfg.precision, cfg.accelerator)
        self.eval_precision = resolve(cfg.eval_precision, cfg.accelerator)
        L.seed_everything(cfg.seed, verbose=False)
        start = time.perf_counter()
        if self._loads_sharded():
            # FSDP: every rank builds the model on the meta device and later reads only its own shard
            from transformers import AutoTokenizer

            directory = local_checkpoint_dir(cfg.model, cfg.cache_dir)
            self.model = meta_model(directory, load_dtype(self.precision))
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or directory)
        else:
            self.model, self.tokenizer = load_model(
                cfg.model, dtype=load_dtype(self.precision), tokenizer_source=cfg.tokenizer,
                trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir,
            )
        self.layout: ModelLayout = describe(self.model)
        check_budget(self.layout, cfg.pruning_ratio, cfg.constraints)
        self.timings["load_model_s"] = time.perf_counter() - start
        self.saved_table = load_table(cfg.from_table, self.layout) if cfg.from_table else None
        self.cal_windows = None
        if self._needs_calibration_windows():
            cal_tokens = tokenize(load_text(cfg.dataset, "calibration"), self.tokenizer)
            self.cal_windows = calibration_windows(cal_tokens, cfg.num_samples, cfg.seq_len, cfg.seed)
        self.eval_windows = None
        if self.rank == 0 and (cfg.test_before_prune or (cfg.test_after_prune and not cfg.table_only)):
            eval_tokens = tokenize(load_text(cfg.eval_dataset, "evaluation"), self.tokenizer)
            self.eval_windows = evaluation_windows(eval_tokens, cfg.eval_seq_len, cfg.eval_max_windows)
        self._open_run_dir()

    def _loads_sharded(self) -> bool:
        cfg = self.cfg
        return cfg.strategy == "fsdp" and cfg.from_table is None and needs_calibration_data(cfg.importance_method)

    def full_model(self) -> torch.nn.Module:
        """The dense model, whole, on this process (reloaded when calibration left it sharded)."""
        if self.model is None or any(p.is_meta for p in self.model.parameters()):
            cfg = self.cfg
            self.model, _ = load_model(cfg.model, dtype=load_dtype(self.precision), tokenizer_source=cfg.tokenizer,
                                       trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir)
        return self.model

    def _saved_losses(self, column: str) -> pd.DataFrame | None:
        """B or L measured by the run that wrote the saved table, if it measured them."""
        table = self.saved_table
        if table is None or column not in table.columns or table[column].isna().any():
            return None
        keys = BLOCK if column == "B" else ["layer_idx"]
        return table[[*keys, column]].drop_duplicates(keys).reset_index(drop=True)

    def _needs_calibration_windows(self) -> bool:
        cfg, t = self.cfg, self.cfg.transforms
        if cfg.from_table is None and needs_calibration_data(cfg.importance_method):
            return True
        return (t.needs_block_losses and self._saved_losses("B") is None) or (
            t.needs_layer_losses and self._saved_losses("L") is None)

    def _open_run_dir(self) -> None:
        if self.rank != 0:  # only rank 0 writes
            self._log_handler = logging.NullHandler()
            return
        self._log_handler = open_run_log(self.run_dir, log, self.cfg.to_dict())
        log.info("gp-lightning %s: model=%s layers=%d params=%d prunable=%d precision=%s",
                 __version__, self.cfg.model, self.layout.num_layers, self.layout.total_params,
                 self.layout.prunable_params, self.precision)

    # -- steps ---------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, key: str) -> float:
        assert self.eval_windows is not None
        return measure_perplexity(model, self.eval_windows, self.cfg.eval_batch_size, self.eval_precision, key,
                                  self.evaluation, self.timings)

    def calibrate(self) -> UnitImportance:
        cfg = self.cfg
        start = time.perf_counter()
        importance = run_calibration(
            self.model, self.layout, self.cal_windows, cfg.batch_size, self.precision, cfg.accelerator,
            default_root_dir=str(self.run_dir), method=cfg.importance_method,
            fisher_batch_size=cfg.fisher_batch_size, seed=cfg.seed, strategy=cfg.strategy, devices=cfg.devices,
            num_nodes=cfg.num_nodes, checkpoint_dir=str(self.run_dir / "calibration_state"),
            checkpoint_every=cfg.checkpoint_every, resume=cfg.resume,
            activation_checkpointing=cfg.activation_checkpointing,
        )
        if cfg.strategy in ("fsdp", "deepspeed") and needs_calibration_data(cfg.importance_method):
            self.model = None  # sharded over the ranks now; rank 0 reloads it only if it needs it whole
        else:
            self.model = self.model.cpu()
        self.timings["calibration_s"] = time.perf_counter() - start
        log.info("calibration (%s) in %.1f s", cfg.importance_method, self.timings["calibration_s"])
        self.gradient_statistics = importance.gradient_statistics
        if importance.gradient_statistics is not None and self.rank == 0:
            write_json(self.run_dir / "analysis" / "gradient_statistics.json", importance.gradient_statistics)
        if importance.details:
            self.evaluation["importance_details"] = importance.details
            log.info("importance details: %s", importance.details)
        return importance

    def raw_table(self) -> pd.DataFrame:
        """Per-unit raw importance: calibrated now, or read from ``from_table``."""
        if self.saved_table is not None:
            log.info("importance read from %s (no calibration)", self.cfg.from_table)
            return self.saved_table[["layer_idx", "group_type", "group_idx", "cost", "importance_raw"]].copy()
        return build_table(self.layout, self.calibrate())

    def ablation(self) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
        """Block (B) and layer (L) skip-ablation losses the transforms need, reused from a saved table if there."""
        cfg, t = self.cfg, self.cfg.transforms
        blocks = self._saved_losses("B") if t.needs_block_losses else None
        layers = self._saved_losses("L") if t.needs_layer_losses else None
        measure_blocks = t.needs_block_losses and blocks is None
        measure_layers = t.needs_layer_losses and layers is None
        if measure_blocks or measure_layers:
            assert self.cal_windows is not None
            start = time.perf_counter()
            base, new_blocks, new_layers = ablation_losses(
                self.full_model(), self.layout, self.cal_windows[: cfg.block_eval_samples], cfg.batch_size,
                blocks=measure_blocks, layers=measure_layers,
            )
            self.timings["ablation_s"] = time.perf_counter() - start
            self.ablation_base_loss = base
            log.info("skip-ablation on %d windows: base loss %.4f", min(cfg.block_eval_samples, len(self.cal_windows)),
                     base)
            blocks = new_blocks if measure_blocks else blocks
            layers = new_layers if measure_layers else layers
        return blocks, layers

    def rank_table(self, raw: pd.DataFrame) -> pd.DataFrame:
        """Apply the table transforms and write the ranked table and the transforms report."""
        blocks, layers = self.ablation()
        table, report = transform_table(raw, self.cfg.transforms, self.layout.num_layers, blocks, layers)
        for key, what in (("temperature", "floored_blocks"), ("tau", "floored_layers")):
            if report.get(key, {}).get(what):
                log.warning("skipping these made the calibration loss no worse; their B/L is floored at %g: %s",
                            report[key]["floor"], report[key][what])
        if hasattr(self, "ablation_base_loss"):
            report["ablation_base_loss"] = self.ablation_base_loss
        table = ranked(table)
        write_csv(self.run_dir / "global_group_table.csv", table)
        write_json(self.run_dir / "table_transforms.json", report)
        return table

    def select(self, table: pd.DataFrame) -> Selection:
        cfg = self.cfg
        selection = select(table, self.layout, cfg.pruning_ratio, cfg.constraints, cfg.remove_empty_layers)
        write_csv(self.run_dir / "groups_to_prune.csv", selection.pruned)
        summary = layer_summary(self.layout, selection.plan, table)
        self.summary = summary
        write_csv(self.run_dir / "analysis" / "pruning_summary_by_layer.csv", summary)
        write_text(self.run_dir / "analysis" / "pruning_summary_by_layer.txt", layer_summary_text(summary))
        write_text(self.run_dir / "pruning_plan.json", selection.plan.to_json())
        start = time.perf_counter()
        self.diagnosis = diagnosis = diagnose(summary, table, self.gradient_statistics, cfg.extreme_rate,
                             self.layout.num_layers)
        write_json(self.run_dir / "analysis" / "gradient_diagnosis.json", diagnosis)
        visuals = self.run_dir / "visualization"
        save_png(pruning_rates_figure(summary), visuals / "pruning_rates.png")
        if self.gradient_statistics:
            save_png(gradient_analysis_figure(self.gradient_statistics, summary, table), visuals / "gradient_analysis.png")
        self.timings["analysis_s"] = time.perf_counter() - start + (self.gradient_statistics or {}).get("seconds", 0.0)
        for issue in diagnosis["issues"]:
            log.warning("diagnosis (%s): %s", issue["severity"], issue["message"])
        if diagnosis["recommendations"]:
            log.warning("recommended: %s (see analysis/gradient_diagnosis.json)",
                        ", ".join(f"{r['key']}: {r['value']}" for r in diagnosis["recommendations"]))
        log.info("selected %d units: %.4f of all params (%.4f of prunable), target %.4f",
                 len(selection.pruned), selection.ratio, selection.ratio_of_prunable, cfg.pruning_ratio)
        return selection

    def prune_streamed(self, selection: Selection) -> torch.nn.Module:
        """Write ``model/`` straight from the original safetensors, one tensor at a time; reload it."""
        start = time.perf_counter()
        source = local_checkpoint_dir(self.cfg.model, self.cfg.cache_dir)
        self.model = None  # the weights are read from disk instead
        stream_prune(source, self.layout, selection.plan, self.provenance(selection), self.run_dir / "model",
                     tokenizer=self.tokenizer)
        self.timings["surgery_s"] = time.perf_counter() - start
        return load_pruned(self.run_dir / "model")

    def provenance(self, selection: Selection) -> dict[str, Any]:
        return {
            "base_model": self.cfg.model, "pruning_ratio": self.cfg.pruning_ratio,
            "achieved_ratio": selection.ratio, "importance_method": self.cfg.importance_method,
            "table_transforms": dataclasses.asdict(self.cfg.transforms),
            "gp_lightning_version": __version__,
        }

    def prune(self, selection: Selection) -> torch.nn.Module:
        provenance = self.provenance(selection)
        start = time.perf_counter()
        pruned = apply_plan(self.full_model(), self.layout, selection.plan, provenance)
        self.timings["surgery_s"] = time.perf_counter() - start
        return pruned

    def save(self, pruned: torch.nn.Module) -> None:
        if self.cfg.save_model:
            start = time.perf_counter()
            save_pruned(pruned, self.tokenizer, self.run_dir / "model")
            self.timings["save_s"] = time.perf_counter() - start

    def run(self) -> RunResult:
        self.setup()
        try:
            if self.cfg.test_before_prune and self.eval_windows is not None:
                self.evaluate(self.full_model(), "before")
            raw = self.raw_table()
            if self.rank != 0:
                return self._follow_rank_zero(raw)
            try:
                table = self.rank_table(raw)
                selection = None if self.cfg.table_only else self.select(table)
            except BaseException as exc:
                broadcast_from_zero({"error": f"{type(exc).__name__}: {exc}"})
                raise
            broadcast_from_zero({"plan": None if selection is None else selection.plan.to_json()})
            if selection is None:
                return self._finish_table_only(table)
            if self.cfg.streamed_surgery:
                pruned = self.prune_streamed(selection)
            else:
                pruned = self.prune(selection)
                self.model = None
                self.save(pruned)
            if self.cfg.test_after_prune:
                self.evaluate(pruned, "after")
            params_after = sum(p.numel() for p in pruned.parameters())
            write_json(self.run_dir / "analysis" / "pruning_comparison.json",
                       pruning_comparison(self.layout, self.summary, params_after))
            results = {
                **selection.summary(),
                # the real count also drops the norms of emptied blocks
                "params_after": params_after,
                "achieved_ratio_actual": 1 - params_after / selection.total_params,
                **self.evaluation,
                "eval_dataset": self.cfg.eval_dataset,
                "eval_seq_len": self.cfg.eval_seq_len,
                "eval_windows": 0 if self.eval_windows is None else int(self.eval_windows.shape[0]),
                "precision": self.precision,
                "eval_precision": self.eval_precision,
                "extreme_layers": [e["layer_idx"] for e in self.diagnosis["extreme_layers"]],
                "timings_s": self.timings,
            }
            write_json(self.run_dir / "evaluation_results.json", results)
            write_text(self.run_dir / "description.txt", describe_run(self.cfg, self.layout, results))
            finetuned = None
            if self.cfg.finetune:
                finetuned = self.finetune(pruned)
                results["finetune"] = {key: finetuned.evaluation.get(key) for key in FINETUNE_SUMMARY}
                write_json(self.run_dir / "evaluation_results.json", results)
            log.info("done: %s", self.run_dir)
            return RunResult(self.run_dir, table, selection, pruned, results, finetuned)
        finally:
            log.removeHandler(self._log_handler)
            self._log_handler.close()


    def finetune(self, pruned: torch.nn.Module | None) -> FinetuneResult:
        """Recovery fine-tune of the pruned model into ``output/finetune``; every rank of a distributed run joins.

        One process fine-tunes the pruned model in memory. Several processes all start from the
        checkpoint rank 0 saved (the broadcast tells the other ranks it is complete).
        """
        settings = self.cfg.finetune_settings
        broadcast_from_zero(str(self.run_dir / "model"))
        model = None if distributed() else pruned
        cfg, known = self.cfg, self.evaluation.get("ppl_after")
        same_windows = (settings.eval_dataset, settings.eval_seq_len, settings.eval_max_windows,
                        settings.eval_precision) == (cfg.eval_dataset, cfg.eval_seq_len, cfg.eval_max_windows,
                                                     cfg.eval_precision)
        reuse = self.rank == 0 and known is not None and same_windows and settings.test_before_finetune
        if reuse:  # the pruned model's perplexity was just measured on the same windows
            settings = dataclasses.replace(settings, test_before_finetune=False)
        recipe = FinetuneRecipe(settings, model=model, tokenizer=None if model is None else self.tokenizer)
        if reuse:
            recipe.evaluation["ppl_before"] = known
        log.info("recovery fine-tuning (%s) into %s", settings.finetune_method, settings.output)
        return recipe.run()

    def _follow_rank_zero(self, raw: pd.DataFrame) -> RunResult:
        """Ranks other than 0: receive the plan rank 0 selected (or its error) and stop."""
        message = broadcast_from_zero(None)
        if "error" in message:
            raise RuntimeError(f"rank 0 failed: {message['error']}")
        plan = None if message["plan"] is None else PruningPlan.from_json(message["plan"])
        log.info("rank %d: received the plan of rank 0 (%s)", self.rank,
                 "table only" if plan is None else f"{sum(len(lp.keep_channels) for lp in plan.layers)} channels kept")
        self.received_plan = plan
        finetuned = self.finetune(None) if self.cfg.finetune and plan is not None else None
        return RunResult(self.run_dir, raw, None, None, {"rank": self.rank}, finetuned)

    def _finish_table_only(self, table: pd.DataFrame) -> RunResult:
        results = {"table_only": True, "units": len(table), "total_params": self.layout.total_params,
                   "prunable_params": self.layout.prunable_params, **self.evaluation, "timings_s": self.timings}
        write_json(self.run_dir / "evaluation_results.json", results)
        write_text(self.run_dir / "description.txt", describe_run(self.cfg, self.layout, results))
        log.info("table written (table_only): %s", self.run_dir / "global_group_table.csv")
        return RunResult(self.run_dir, table, None, None, results)


def oneshot(config: PruneConfig | None = None, **overrides: Any) -> RunResult:
    """Prune in one call: ``oneshot(model="smollm2-135m", pruning_ratio=0.2, output="runs/x")``."""
    if config is None:
        config = PruneConfig(**overrides)
    elif overrides:
        config = PruneConfig(**{**config.to_dict(), **overrides})
    return PruneRecipe(config).run()
