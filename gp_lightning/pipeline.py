"""The prune recipe: data -> calibration -> table -> selection -> surgery -> evaluation -> export.

:class:`PruneRecipe` runs the steps in order and writes every artefact into the run directory;
:func:`oneshot` is the one-call entry for Python users. Everything that can be wrong with the input
(config, model, data, output directory) is checked in :meth:`PruneRecipe.setup`, before the run
directory is created, so a bad invocation leaves nothing behind.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import torch
import yaml

from gp_lightning import __version__
from gp_lightning.architecture import ModelLayout, describe
from gp_lightning.calibration import run_calibration
from gp_lightning.calibration.ablation import ablation_losses
from gp_lightning.calibration.units import UnitImportance
from gp_lightning.config import PruneConfig
from gp_lightning.data import calibration_windows, evaluation_windows, load_text, tokenize
from gp_lightning.errors import ConfigError
from gp_lightning.evaluation import perplexity
from gp_lightning.export.checkpoint import save_pruned
from gp_lightning.io import check_run_dir, write_csv, write_json, write_text
from gp_lightning.model_source import load_model
from gp_lightning.precision import load_dtype, resolve
from gp_lightning.reports import describe_run, layer_summary_text
from gp_lightning.selection import Selection, check_budget, layer_summary, select
from gp_lightning.surgery import apply_plan
from gp_lightning.table import apply_block_temperature, apply_layer_tau, build_table, ranked

log = logging.getLogger("gp_lightning")


@dataclass
class RunResult:
    """What a run produced (everything is also on disk in ``run_dir``)."""

    run_dir: Path
    table: pd.DataFrame
    selection: Selection
    pruned_model: torch.nn.Module
    evaluation: dict[str, Any] = field(default_factory=dict)


class PruneRecipe:
    """One global pruning run. Call :meth:`run`, or the steps one by one."""

    def __init__(self, config: PruneConfig) -> None:
        self.cfg = config
        self.run_dir = Path(config.output)
        self.timings: dict[str, float] = {}
        self.evaluation: dict[str, Any] = {}

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        check_run_dir(self.run_dir, cfg.overwrite)
        self.precision = resolve(cfg.precision, cfg.accelerator)
        self.eval_precision = resolve(cfg.eval_precision, cfg.accelerator)
        L.seed_everything(cfg.seed, verbose=False)
        start = time.perf_counter()
        self.model, self.tokenizer = load_model(
            cfg.model, dtype=load_dtype(self.precision), tokenizer_source=cfg.tokenizer,
            trust_remote_code=cfg.trust_remote_code, cache_dir=cfg.cache_dir,
        )
        self.layout: ModelLayout = describe(self.model)
        if cfg.layer_start >= self.layout.num_layers:
            raise ConfigError(
                f"Config key 'layer_start' = {cfg.layer_start} is invalid: the model has only "
                f"{self.layout.num_layers} layers."
            )
        check_budget(self.layout, cfg.pruning_ratio, cfg.layer_start, cfg.layer_end)
        self.timings["load_model_s"] = time.perf_counter() - start
        cal_tokens = tokenize(load_text(cfg.dataset, "calibration"), self.tokenizer)
        self.cal_windows = calibration_windows(cal_tokens, cfg.num_samples, cfg.seq_len, cfg.seed)
        self.eval_windows = None
        if cfg.test_before_prune or cfg.test_after_prune:
            eval_tokens = tokenize(load_text(cfg.eval_dataset, "evaluation"), self.tokenizer)
            self.eval_windows = evaluation_windows(eval_tokens, cfg.eval_seq_len, cfg.eval_max_windows)
        self._open_run_dir()

    def _open_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.run_dir / "training.log", mode="w", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        self._log_handler = handler
        write_text(self.run_dir / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
        log.info("gp-lightning %s: model=%s layers=%d params=%d prunable=%d precision=%s",
                 __version__, self.cfg.model, self.layout.num_layers, self.layout.total_params,
                 self.layout.prunable_params, self.precision)

    # -- steps ---------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, key: str) -> float:
        assert self.eval_windows is not None
        start = time.perf_counter()
        ppl = perplexity(model, self.eval_windows, self.cfg.eval_batch_size, self.eval_precision,
                         desc=f"Perplexity ({key})")
        self.timings[f"eval_{key}_s"] = time.perf_counter() - start
        self.evaluation[f"ppl_{key}"] = ppl
        log.info("perplexity %s: %.4f on %d windows of %d tokens", key, ppl, *self.eval_windows.shape)
        return ppl

    def calibrate(self) -> UnitImportance:
        cfg = self.cfg
        start = time.perf_counter()
        importance = run_calibration(self.model, self.layout, self.cal_windows, cfg.batch_size, self.precision,
                                     cfg.accelerator, default_root_dir=str(self.run_dir))
        self.model = self.model.cpu()
        self.timings["calibration_s"] = time.perf_counter() - start
        log.info("calibration: %d windows x %d tokens in %.1f s", *self.cal_windows.shape, self.timings["calibration_s"])
        return importance

    def rank(self, importance: UnitImportance) -> pd.DataFrame:
        cfg = self.cfg
        table = build_table(self.layout, importance)
        if cfg.needs_ablation:
            start = time.perf_counter()
            windows = self.cal_windows[: cfg.block_eval_samples]
            base, blocks, layers = ablation_losses(
                self.model, self.layout, windows, cfg.batch_size, blocks=cfg.temperature > 0, layers=cfg.tau > 0
            )
            self.timings["ablation_s"] = time.perf_counter() - start
            floored = int((blocks["B"] <= 0).sum()) + int((layers["L"] <= 0).sum())
            log.info("skip-ablation: base loss %.4f; %d block/layer losses <= 0 floored", base, floored)
            table = apply_block_temperature(table, blocks, cfg.temperature)
            table = apply_layer_tau(table, layers, cfg.tau)
        table = ranked(table)
        write_csv(self.run_dir / "global_group_table.csv", table)
        return table

    def select(self, table: pd.DataFrame) -> Selection:
        cfg = self.cfg
        selection = select(table, self.layout, cfg.pruning_ratio, cfg.layer_start, cfg.layer_end,
                           cfg.remove_empty_layers)
        write_csv(self.run_dir / "groups_to_prune.csv", selection.pruned)
        summary = layer_summary(self.layout, selection.plan)
        write_csv(self.run_dir / "pruning_summary_by_layer.csv", summary)
        write_text(self.run_dir / "pruning_summary_by_layer.txt", layer_summary_text(summary))
        write_text(self.run_dir / "pruning_plan.json", selection.plan.to_json())
        log.info("selected %d units: %.4f of all params (%.4f of prunable), target %.4f",
                 len(selection.pruned), selection.ratio, selection.ratio_of_prunable, cfg.pruning_ratio)
        return selection

    def prune(self, selection: Selection) -> torch.nn.Module:
        provenance = {
            "base_model": self.cfg.model, "pruning_ratio": self.cfg.pruning_ratio,
            "achieved_ratio": selection.ratio, "importance_method": self.cfg.importance_method,
            "gp_lightning_version": __version__,
        }
        start = time.perf_counter()
        pruned = apply_plan(self.model, self.layout, selection.plan, provenance)
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
            if self.cfg.test_before_prune:
                self.evaluate(self.model, "before")
            importance = self.calibrate()
            table = self.rank(importance)
            selection = self.select(table)
            pruned = self.prune(selection)
            del self.model
            if self.cfg.test_after_prune:
                self.evaluate(pruned, "after")
            self.save(pruned)
            params_after = sum(p.numel() for p in pruned.parameters())
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
                "timings_s": self.timings,
            }
            write_json(self.run_dir / "evaluation_results.json", results)
            write_text(self.run_dir / "description.txt", describe_run(self.cfg, self.layout, results))
            log.info("done: %s", self.run_dir)
            return RunResult(self.run_dir, table, selection, pruned, results)
        finally:
            log.removeHandler(self._log_handler)
            self._log_handler.close()


def oneshot(config: PruneConfig | None = None, **overrides: Any) -> RunResult:
    """Prune in one call: ``oneshot(model="smollm2-135m", pruning_ratio=0.2, output="runs/x")``."""
    if config is None:
        config = PruneConfig(**overrides)
    elif overrides:
        config = PruneConfig(**{**config.to_dict(), **overrides})
    return PruneRecipe(config).run()
