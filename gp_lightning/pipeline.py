"""The prune recipe: setup -> calibrate -> order -> select -> analyze -> prune -> evaluate -> save, and ``oneshot``.

Each step is a function of its step package from typed inputs to a typed artefact (calibration ->
:class:`UnitImportance`, table -> :class:`OrderedTable`, selection -> :class:`Selection`, analysis
-> :class:`Analysis`, surgery -> the pruned model, evaluation -> perplexities); the
:class:`PruneRunWriter` puts the artefacts into the run directory. :class:`PruneRecipe` is the thin
driver that calls them in order and holds the rank policy: every rank calibrates, rank 0 alone
ranks, selects, prunes, evaluates and writes, and broadcasts the plan (or its error) to the others.
Everything that can be wrong with the input is checked in :meth:`PruneRecipe.setup`, before the run
directory is made, so a bad invocation leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from gp_lightning import __version__
from gp_lightning.analysis.reports import describe_run, pruning_comparison
from gp_lightning.analysis.run_directory import Analysis, PruneResults, PruneRunWriter, analyze
from gp_lightning.calibration.methods import needs_calibration_data
from gp_lightning.calibration.run import run_calibration
from gp_lightning.calibration.units import UnitImportance
from gp_lightning.compensation.run import Compensation, compensate
from gp_lightning.config import PruneConfig
from gp_lightning.data.mixture import check_sources, is_mixture, mixture_summary, mixture_windows
from gp_lightning.data.sources import check_source
from gp_lightning.evaluation.evaluator import Evaluator
from gp_lightning.evaluation.zero_shot import ZeroShot
from gp_lightning.export.checkpoint import load_pruned, save_checkpoint, save_pruned
from gp_lightning.export.gguf_writer import export_gguf
from gp_lightning.export.stock import STOCK_CLASSES, to_stock
from gp_lightning.finetune.recipe import FinetuneRecipe, FinetuneResult
from gp_lightning.model.layout import ModelLayout, check_sequence_lengths, describe
from gp_lightning.model.sharded import meta_model
from gp_lightning.model.source import local_checkpoint_dir
from gp_lightning.runtime import run_manifest
from gp_lightning.runtime.errors import ConfigError
from gp_lightning.runtime.launch import launcher_warning
from gp_lightning.runtime.precision import holds, load_dtype
from gp_lightning.runtime.ranks import broadcast_from_zero, distributed, process_group, world_size
from gp_lightning.runtime.recipe import Recipe
from gp_lightning.search.evolution import Space
from gp_lightning.search.run import SearchInputs, search_allocation
from gp_lightning.search.step import plan_of, reapplied, seeds
from gp_lightning.selection.greedy import check_budget, select
from gp_lightning.selection.plan import PruningPlan
from gp_lightning.selection.result import Selection, with_plan
from gp_lightning.surgery.in_memory import apply_plan
from gp_lightning.surgery.streamed import stream_prune
from gp_lightning.table.ablation import AblationLosses, ablation_losses
from gp_lightning.table.build import build_table
from gp_lightning.table.saved import check_table_file, load_table, saved_losses
from gp_lightning.table.transforms import OrderedTable, order_units

log = logging.getLogger("gp_lightning")

#: What the pruning run's evaluation_results.json repeats of its fine-tune (the rest is in output/finetune).
FINETUNE_SUMMARY = ("finetune_method", "ppl_before", "ppl_after", "optimizer_steps", "train_loss_first",
                    "train_loss_last", "saved")


@dataclass
class RunResult:
    """What a run produced (everything is also on disk in ``run_dir``)."""

    run_dir: Path
    table: pd.DataFrame
    selection: Selection | None  # None with table_only, and on ranks other than 0
    pruned_model: torch.nn.Module | None  # with finetune: the same model, fine-tuned and merged
    evaluation: dict[str, Any] = field(default_factory=dict)
    finetuned: FinetuneResult | None = None  # with finetune


class PruneRecipe(Recipe):
    """One global pruning run. Call :meth:`run`, or the steps one by one."""

    def __init__(self, config: PruneConfig) -> None:
        super().__init__(config.run, config.distributed, config.evaluation.eval_precision)
        self.cfg = config
        self.writer = PruneRunWriter(self.run_dir, self.rank)
        self.model: torch.nn.Module | None = None
        self.tokenizer: Any = None
        self.layout: ModelLayout | None = None
        self.target = 0  # parameters to remove, checked against the limits in setup
        self.saved_table: pd.DataFrame | None = None
        self.cal_windows: torch.Tensor | None = None
        self.refit_windows: torch.Tensor | None = None  # the compensation's (the calibration windows first)
        self.search_windows: torch.Tensor | None = None  # allocation: search's fitness and held-out windows
        self.evaluator = Evaluator(None, config.evaluation.eval_batch_size, "32-true", timings=self.timings)
        self.gradient_statistics: dict | None = None
        self.zero_shot: ZeroShot | None = None  # eval_tasks, checked in setup

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, e = self.cfg, self.cfg.evaluation
        if cfg.table.from_table:  # before the run directory is touched: no such file, or an unfinished run's
            check_table_file(Path(cfg.table.from_table).expanduser())
            run_manifest.require_complete(cfg.table.from_table, "from_table",
                                          allow_unfinished=cfg.table.allow_unfinished_table)
        run_manifest.require_complete(cfg.source.model, "model", own_output=cfg.run.output)  # a pruned model again
        self.zero_shot = None if cfg.table.table_only else ZeroShot.of(e)  # tasks known, data loaded: before any write
        self.start(cfg.run.overwrite, cfg.to_dict(), resume=cfg.calibration.resume)
        self._check_recovery()
        needed = self.rank == 0 and (e.test_before_prune or (e.test_after_prune and not cfg.table.table_only))
        if cfg.table.from_table is None and self._needs_calibration_windows():  # (from a table: known once read)
            check_sources(cfg.data.dataset, "calibration")  # a missing file or hub stops here, not after the load
        if needed:
            check_source(e.eval_dataset, "evaluation")
        warning = launcher_warning()
        if warning:
            warnings.warn(warning, stacklevel=2)
        with self.timed("load_model_s"):
            self.model, self.tokenizer = self._load()
            self.layout = describe(self.model)
            self.target = check_budget(self.layout, cfg.selection)
            check_sequence_lengths(self.model, {"seq_len": cfg.data.seq_len,
                                                "eval_seq_len": cfg.evaluation.eval_seq_len})
        self._check_stock_shape()
        if cfg.table.from_table:
            self.saved_table = load_table(cfg.table.from_table, self.layout, cfg.table.allow_unfinished_table)
        if self._needs_calibration_windows():
            refit = cfg.refit.compensation_samples or cfg.data.num_samples
            count = max(cfg.data.num_samples, refit if cfg.refit.enabled or self.searching else 0)
            extra = cfg.search.search_windows if self.searching else 0
            windows = mixture_windows(cfg.data.dataset, self.tokenizer, count + extra, cfg.data.seq_len, cfg.run.seed,
                                      cfg.data.text_encoding)  # the first ones calibrate
            self.cal_windows, self.refit_windows = windows[: cfg.data.num_samples], windows[:refit]
            self.search_windows = windows[count:]  # the search's own (none without it)
        self.evaluator = Evaluator.on(e, self.tokenizer, self.eval_precision, needed, self.timings,
                                      cfg.data.text_encoding)
        self.open_log(cfg.to_dict())
        log.info("gp-lightning %s: model=%s layers=%d params=%d prunable=%d precision=%s (%s)", __version__,
                 cfg.source.model, self.layout.num_layers, self.layout.total_params, self.layout.prunable_params,
                 self.precision, self.precision_reason)
        if self.cal_windows is not None and is_mixture(cfg.data.dataset):
            log.info("calibration mixture, windows per source: %s", mixture_summary(
                cfg.data.dataset, self.cal_windows.shape[0], self.refit_windows.shape[0]))

    def _check_stock_shape(self) -> None:
        """``allocation: uniform_per_layer`` saves the stock class: what it cannot hold is refused or turned off here."""
        cfg = self.cfg
        if cfg.selection.allocation != "uniform_per_layer":
            return
        if cfg.run.streamed_surgery:
            raise ConfigError("allocation: uniform_per_layer saves the stock class from the pruned model in memory: "
                              "set streamed_surgery: false.")
        config = self.model.config
        base = getattr(config, "base_model_type", None) or getattr(config, "model_type", None)
        if base not in STOCK_CLASSES:
            raise ConfigError(f"allocation: uniform_per_layer saves a stock {' / '.join(STOCK_CLASSES)} checkpoint, "
                              f"and this model is '{base}': use allocation: global (a gp_pruned checkpoint).")
        if not self.layout.uniform_widths:
            raise ConfigError("allocation: uniform_per_layer needs a model whose layers all have the same widths, and "
                              f"the layers of {cfg.source.model} differ (it was pruned with allocation: global): use "
                              "allocation: global, or prune the dense model.")
        if base == "llama" or not cfg.refit.enabled:
            return
        if cfg.refit.compensation == "bias":
            raise ConfigError(f"compensation: bias adds output biases, which stock {base} cannot hold: use "
                              "least_squares or none with allocation: uniform_per_layer.")
        if cfg.refit.compensation_bias:
            cfg.refit.compensation_bias = False
            log.info("stock %s has no o_proj/down_proj bias: the refit adds none (compensation_bias: false)", base)

    def _check_recovery(self) -> None:
        """A fine-tune after pruning fails here, before calibration, not after pruning."""
        cfg = self.cfg
        if not cfg.recovery.finetune:
            return
        if not (cfg.run.save_model or cfg.run.streamed_surgery) and world_size() > 1:
            raise ConfigError("finetune in a distributed run starts every rank from the saved pruned model: set "
                              "save_model: true.")
        settings = cfg.finetune_settings()
        check_source(settings.data.dataset, "calibration")
        check_source(settings.evaluation.eval_dataset, "evaluation")

    def _load(self) -> tuple[torch.nn.Module, Any]:
        """The dense model (under FSDP on the meta device: each rank reads its own shard later)."""
        cfg = self.cfg
        dtype = load_dtype(self.precision)
        sharded = (cfg.distributed.strategy == "fsdp" and cfg.table.from_table is None
                   and needs_calibration_data(cfg.calibration.importance_method)) or (
            cfg.refit.compensation_offload and cfg.table.from_table is not None)  # never the whole model
        if not sharded:
            return cfg.source.load(dtype)
        from transformers import AutoTokenizer

        directory = local_checkpoint_dir(cfg.source.model, cfg.source.cache_dir)
        return meta_model(directory, dtype), AutoTokenizer.from_pretrained(cfg.source.tokenizer or directory)

    def full_model(self, exact: bool = False) -> torch.nn.Module:
        """The dense model, whole, on this process (reloaded when calibration left it sharded). ``exact``: in a
        dtype that holds the source's weights exactly (compensation and surgery), reloaded if needed."""
        dtype = self.weights_dtype(exact)
        if exact and self.model is not None and next(self.model.parameters()).dtype != dtype:
            log.info("reloading the dense model in %s for compensation and surgery (the %s compute precision cannot "
                     "hold its weights exactly)", dtype, self.precision)
            self.model = None  # freed before the reload
        if self.model is None or any(p.is_meta for p in self.model.parameters()):
            self.model, _ = self.cfg.source.load(dtype)
        return self.model

    def offloaded_model(self) -> torch.nn.Module:
        """The dense model on the meta device, its layers to be read from disk one at a time."""
        directory = local_checkpoint_dir(self.cfg.source.model, self.cfg.source.cache_dir)
        self.model = None  # what calibration held is not needed again: surgery streams from disk
        return meta_model(directory, self.weights_dtype(exact=True))

    @functools.cached_property
    def source_dtype(self) -> torch.dtype:
        """The dtype the source checkpoint stores its weights in."""
        return self.cfg.source.storage_dtype()

    def weights_dtype(self, exact: bool) -> torch.dtype:
        """The compute precision's weight dtype; with ``exact``, the source's where that one would round them."""
        compute = load_dtype(self.precision)
        return compute if not exact or holds(compute, self.source_dtype) else self.source_dtype

    def save_dtype(self) -> torch.dtype:
        """The pruned checkpoint's dtype: ``save_dtype``, or the source's."""
        chosen = self.cfg.run.save_dtype
        return self.source_dtype if chosen == "auto" else getattr(torch, chosen)

    @property
    def searching(self) -> bool:
        """Whether this run searches the widths (``allocation: search`` without ``search_widths``)."""
        return (self.cfg.selection.allocation == "search" and not self.cfg.search.search_widths
                and not self.cfg.table.table_only)

    def _needs_calibration_windows(self) -> bool:
        cfg, t = self.cfg, self.cfg.table
        if (t.from_table is None and needs_calibration_data(cfg.calibration.importance_method)) or (
                (cfg.refit.enabled or self.searching) and not t.table_only):
            return True
        blocks, layers = t.losses_needed()
        return (blocks and saved_losses(self.saved_table, "B") is None) or (
            layers and saved_losses(self.saved_table, "L") is None)

    # -- steps ---------------------------------------------------------------------------------
    def calibrate(self) -> UnitImportance:
        cfg = self.cfg
        assert self.model is not None and self.layout is not None
        with self.timed("calibration_s"):
            importance = run_calibration(self.model, self.layout, self.cal_windows, cfg.data.batch_size,
                                         cfg.calibration, cfg.distributed, precision=self.precision,
                                         seed=cfg.run.seed, run_dir=self.run_dir)
        if cfg.distributed.strategy in ("fsdp", "deepspeed") and needs_calibration_data(cfg.calibration.importance_method):
            self.model = None  # sharded over the ranks now; rank 0 reloads it only if it needs it whole
        else:
            self.model = self.model.cpu()
        log.info("calibration (%s) in %.1f s", cfg.calibration.importance_method, self.timings["calibration_s"])
        self.gradient_statistics = importance.gradient_statistics
        self.writer.gradient_statistics(importance.gradient_statistics)
        if importance.details:
            self.evaluator.results["importance_details"] = importance.details
            log.info("importance details: %s", importance.details)
        return importance

    def raw_table(self) -> pd.DataFrame:
        """Per-unit raw importance: calibrated now, or read from ``from_table``."""
        assert self.layout is not None
        if self.saved_table is not None:
            log.info("importance read from %s (no calibration)", self.cfg.table.from_table)
            return self.saved_table[["layer_idx", "group_type", "group_idx", "cost", "importance_raw"]].copy()
        return build_table(self.layout, self.calibrate())

    def ablation(self) -> AblationLosses:
        """Block (B) and layer (L) skip-ablation losses the transforms need, reused from a saved table if there."""
        cfg, t = self.cfg, self.cfg.table
        assert self.layout is not None
        need_blocks, need_layers = t.losses_needed()
        blocks = saved_losses(self.saved_table, "B") if need_blocks else None
        layers = saved_losses(self.saved_table, "L") if need_layers else None
        measure_blocks, measure_layers = need_blocks and blocks is None, need_layers and layers is None
        if not (measure_blocks or measure_layers):
            return AblationLosses(blocks, layers)
        assert self.cal_windows is not None
        windows = self.cal_windows[: t.block_eval_samples]
        with self.timed("ablation_s"):
            base, new_blocks, new_layers = ablation_losses(self.full_model(), self.layout, windows, cfg.data.batch_size,
                                                           blocks=measure_blocks, layers=measure_layers)
        log.info("skip-ablation on %d windows: base loss %.4f", len(windows), base)
        return AblationLosses(new_blocks if measure_blocks else blocks, new_layers if measure_layers else layers, base)

    def order(self, raw: pd.DataFrame) -> OrderedTable:
        """The table step: transforms, then every unit by ascending score."""
        assert self.layout is not None
        ordered = order_units(raw, self.cfg.table, self.layout.num_layers, self.ablation())
        for key, what in (("temperature", "floored_blocks"), ("tau", "floored_layers")):
            if ordered.report.get(key, {}).get(what):
                log.warning("skipping these made the calibration loss no worse; their B/L is floored at %g: %s",
                            ordered.report[key]["floor"], ordered.report[key][what])
        self.writer.table(ordered)
        return ordered

    def select(self, ordered: OrderedTable) -> Selection:
        """The selection step: lowest scores first until the budget is met."""
        cfg = self.cfg
        assert self.layout is not None
        selection = select(ordered.table, self.layout, cfg.selection)
        log.info("selected %d units: %.4f of all params (%.4f of prunable), target %.4f", len(selection.pruned),
                 selection.ratio, selection.ratio_of_prunable, cfg.selection.pruning_ratio)
        return selection

    def search(self, table: pd.DataFrame, knapsack: PruningPlan) -> PruningPlan:
        """``allocation: search`` (every rank joins: the fitness is data-parallel): the plan of the chosen widths."""
        cfg = self.cfg
        assert self.layout is not None
        target = self.target
        if cfg.search.search_widths:
            kept = reapplied(cfg.search.search_widths, Space.of(self.layout, cfg.selection, target))
            return plan_of(table, self.layout, cfg.selection, kept)
        rank, world = process_group()
        assert self.refit_windows is not None and self.search_windows is not None
        inputs = SearchInputs(self.full_model(exact=True), self.layout, table,
                              seeds(table, self.layout, cfg.selection, knapsack, target), self.refit_windows,
                              self.search_windows, target, cfg.selection, cfg.refit, cfg.search, cfg.data.batch_size,
                              cfg.run.seed, self.run_dir / "search_state.safetensors", cfg.calibration.resume, rank,
                              world)
        with self.timed("search_s"):
            result = search_allocation(inputs)
        self.writer.search(result.report)
        return plan_of(table, self.layout, cfg.selection, result.kept)

    def compensate(self, plan: PruningPlan) -> Compensation | None:
        """The compensation step (every rank of a distributed run joins: each walks its own windows)."""
        refit = self.cfg.refit
        if not refit.enabled:
            return None
        assert self.layout is not None and self.refit_windows is not None
        rank, world = process_group()
        model = self.offloaded_model() if refit.compensation_offload else self.full_model(exact=True)
        with self.timed("compensation_s"):
            result = compensate(model, self.layout, plan, self.refit_windows, refit,
                                self.cfg.data.batch_size, rank, world)
        summary = result.summary(refit)
        self.writer.compensation(summary)
        log.info("compensation (%s%s) of %d projections in %.1f s: mean relative output error %.4f -> %.4f",
                 refit.compensation, ", sequential" if refit.sequential else "", len(result.report),
                 self.timings["compensation_s"], summary["mean_relative_error_before"],
                 summary["mean_relative_error_after"])
        return result

    def analyze(self, selection: Selection, ordered: OrderedTable) -> Analysis:
        """The analysis step (summary, diagnosis, plots), written with the selection."""
        assert self.layout is not None
        analysis = analyze(self.layout, selection, ordered, self.gradient_statistics, self.cfg.run.extreme_rate)
        self.writer.selection(selection, analysis)
        self.timings["analysis_s"] = analysis.seconds + (self.gradient_statistics or {}).get("seconds", 0.0)
        return analysis

    def provenance(self, selection: Selection) -> dict[str, Any]:
        cfg = self.cfg
        return {"base_model": cfg.source.model, "pruning_ratio": cfg.selection.pruning_ratio,
                "achieved_ratio": selection.ratio, "importance_method": cfg.calibration.importance_method,
                "table_transforms": cfg.table.transform_settings(), "compensation": dataclasses.asdict(cfg.refit),
                "gp_lightning_version": __version__}

    def prune(self, selection: Selection, compensation: Compensation | None = None) -> torch.nn.Module:
        """The surgery step: in memory (then saved), or streamed from the dense safetensors into ``model/``."""
        assert self.layout is not None
        if self.cfg.run.streamed_surgery:
            source = local_checkpoint_dir(self.cfg.source.model, self.cfg.source.cache_dir)
            self.model = None  # the weights are read from disk instead
            with self.timed("surgery_s"):
                stream_prune(source, self.layout, selection.plan, self.provenance(selection), self.run_dir / "model",
                             tokenizer=self.tokenizer, compensation=compensation, dtype=self.save_dtype())
            return load_pruned(self.run_dir / "model")
        with self.timed("surgery_s"):
            pruned = apply_plan(self.full_model(exact=True), self.layout, selection.plan, self.provenance(selection),
                                compensation, self.save_dtype())
        self.model = None
        self.save(pruned)
        return pruned

    def save(self, pruned: torch.nn.Module) -> None:
        if self.cfg.run.save_model:
            with self.timed("save_s"):
                if self.cfg.selection.allocation == "uniform_per_layer":  # stock class, no remote code
                    save_checkpoint(to_stock(pruned), self.tokenizer, self.run_dir / "model")
                else:
                    save_pruned(pruned, self.tokenizer, self.run_dir / "model")

    def export_gguf(self) -> None:
        """The GGUF of the saved model, for llama.cpp (``export_gguf``)."""
        kind = self.cfg.run.export_gguf
        if kind is not None:
            with self.timed("export_gguf_s"):
                export_gguf(self.run_dir / "model", self.run_dir / "model.gguf", kind)

    # -- the driver ----------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            self.setup()  # inside: a run stopped by bad input releases the run directory's lock too
            if self.cfg.evaluation.test_before_prune and self.evaluator.windows is not None:
                self.evaluator.measure(self.full_model(), "before")
            raw = self.raw_table()
            if self.rank != 0:
                return self._follow_rank_zero(raw)
            try:
                ordered = self.order(raw)
                selection = None if self.cfg.table.table_only else self.select(ordered)
            except BaseException as exc:
                broadcast_from_zero({"error": f"{type(exc).__name__}: {exc}"})
                raise
            searching = selection is not None and self.cfg.selection.allocation == "search"
            broadcast_from_zero({"plan": None if selection is None else selection.plan.to_json(),
                                 "table": ordered.table if searching else None})
            if selection is None:
                return self._finish_table_only(ordered)
            if searching:  # every rank computes the same widths, so the same plan
                selection = with_plan(selection, self.search(ordered.table, selection.plan), ordered.table)
            return self._finish(ordered, selection)
        finally:
            self.cleanup()

    def _finish(self, ordered: OrderedTable, selection: Selection) -> RunResult:
        """Rank 0 after selection: compensation, analysis, surgery, evaluation, results, the fine-tune if asked."""
        assert self.layout is not None
        compensation = self.compensate(selection.plan)
        if compensation is not None and compensation.plan.to_json() != selection.plan.to_json():
            selection = with_plan(selection, compensation.plan, ordered.table)  # within_layer: obs chose the units
        analysis = self.analyze(selection, ordered)
        pruned = self.prune(selection, compensation)
        self.export_gguf()
        if self.cfg.evaluation.test_after_prune:
            self.evaluator.measure(pruned, "after")
        if self.zero_shot is not None:  # rank 0 alone, as perplexity
            self.zero_shot.measure(pruned, self.tokenizer, self.eval_precision, self.run_dir, self.evaluator.results,
                                   self.timings)
        params_after = sum(p.numel() for p in pruned.parameters())
        output_bias = sum(p.numel() for name, p in pruned.named_parameters() if name.endswith("_output_bias"))
        self.writer.comparison(pruning_comparison(self.layout, analysis.summary, params_after))
        e = self.cfg.evaluation
        results = PruneResults(selection, params_after, output_bias, self.evaluator.results, e.eval_dataset, e.eval_seq_len,
                               self.evaluator.window_count, self.precision, self.eval_precision,
                               analysis.extreme_layers, self.timings)
        self.writer.results(results.to_dict(), self._describe(results.to_dict()))
        finetuned = None
        if self.cfg.recovery.finetune:
            finetuned = self.finetune(pruned)
            results.finetune = {key: finetuned.evaluation.get(key) for key in FINETUNE_SUMMARY}
            self.writer.results(results.to_dict())
        log.info("done: %s", self.run_dir)
        self.finish()
        return RunResult(self.run_dir, ordered.table, selection, pruned, results.to_dict(), finetuned)

    def finetune(self, pruned: torch.nn.Module | None) -> FinetuneResult:
        """Recovery fine-tune of the pruned model into ``output/finetune``; every rank of a distributed run joins.

        One process fine-tunes the pruned model in memory. Several processes all start from the
        checkpoint rank 0 saved (the broadcast tells the other ranks it is complete).
        """
        settings = self.cfg.finetune_settings()
        broadcast_from_zero(str(self.run_dir / "model"))
        model = None if distributed() else pruned
        known = self.evaluator.results.get("ppl_after")
        mine, theirs = self.cfg.evaluation, settings.evaluation
        same_windows = ((theirs.eval_dataset, theirs.eval_seq_len, theirs.eval_max_windows, theirs.eval_precision)
                        == (mine.eval_dataset, mine.eval_seq_len, mine.eval_max_windows, mine.eval_precision))
        reuse = self.rank == 0 and known is not None and same_windows and theirs.test_before_finetune
        if reuse:  # the pruned model's perplexity was just measured on the same windows
            settings = settings.replace(test_before_finetune=False)
        recipe = FinetuneRecipe(settings, model, None if model is None else self.tokenizer, parent_run=self.run_dir)
        if reuse:
            recipe.evaluator.results["ppl_before"] = known
        log.info("recovery fine-tuning (%s) into %s", settings.adapter.finetune_method, settings.run.output)
        return recipe.run()

    def _describe(self, results: dict[str, Any]) -> str:
        assert self.layout is not None
        return describe_run(self.cfg.to_dict(), self.cfg.selection.describe(), self.layout, results)

    def _follow_rank_zero(self, raw: pd.DataFrame) -> RunResult:
        """Ranks other than 0: receive the plan rank 0 selected (or its error) and stop."""
        message = broadcast_from_zero(None)
        if "error" in message:
            raise RuntimeError(f"rank 0 failed: {message['error']}")
        plan = None if message["plan"] is None else PruningPlan.from_json(message["plan"])
        log.info("rank %d: received the plan of rank 0 (%s)", self.rank,
                 "table only" if plan is None else f"{sum(len(lp.keep_channels) for lp in plan.layers)} channels kept")
        if plan is not None and message["table"] is not None:
            plan = self.search(message["table"], plan)  # the fitness needs every rank
        if plan is not None:
            self.compensate(plan)  # its Gram sums need every rank
        finetuned = self.finetune(None) if self.cfg.recovery.finetune and plan is not None else None
        return RunResult(self.run_dir, raw, None, None, {"rank": self.rank}, finetuned)

    def _finish_table_only(self, ordered: OrderedTable) -> RunResult:
        assert self.layout is not None
        results = {"table_only": True, "units": len(ordered.table), "total_params": self.layout.total_params,
                   "prunable_params": self.layout.prunable_params, **self.evaluator.results, "timings_s": self.timings}
        self.writer.results(results, self._describe(results))
        log.info("table written (table_only): %s", self.run_dir / "global_group_table.csv")
        self.finish()
        return RunResult(self.run_dir, ordered.table, None, None, results)


def oneshot(config: PruneConfig | None = None, **keys: Any) -> RunResult:
    """Prune in one call: ``oneshot(model="smollm2-135m", pruning_ratio=0.2, output="runs/x")``."""
    return PruneRecipe(PruneConfig.given(config, **keys)).run()
