"""The typed pruning config: argument groups, one per pipeline step, whose keys are YAML keys and flags.

Each group is declared once, in its step's package, with the doc of every key next to it; this
module puts them together (and adds the two groups that belong to the whole run). Keys stay flat
and follow the pruning guides users know (LLM-Pruner / FLAP): ``--pruning_ratio``, not
``--selection.pruning_ratio``. Values are checked when a group is built; checks that need two
groups at once (a method against a strategy) are here. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from gp_lightning.calibration.config import CalibrationConfig
from gp_lightning.calibration.methods import check_capability
from gp_lightning.compensation.config import CompensationConfig
from gp_lightning.data.config import DataConfig
from gp_lightning.evaluation.config import EvaluationConfig
from gp_lightning.finetune.config import SHARED_WITH_PRUNE, FinetuneConfig
from gp_lightning.model.config import ModelConfig
from gp_lightning.runtime.config import DistributedConfig, GroupedConfig, RunConfig, grouped
from gp_lightning.runtime.errors import check_config
from gp_lightning.search.config import SearchConfig
from gp_lightning.selection.config import SelectionConfig
from gp_lightning.table.config import TableConfig

GGUFType = Literal["f32", "f16", "bf16", "q8_0"]
SaveDType = Literal["auto", "float32", "bfloat16", "float16"]

#: Alternative spellings accepted on the command line, as used by the pruning guides.
FLAG_ALIASES: dict[str, str] = {
    "--base_model": "--model",
    "--model_name_or_path": "--model",
    "--save_ckpt_log_name": "--output",
    "--output_dir": "--output",
}


@dataclass
class OutputConfig(RunConfig):
    """Run directory, seed and console"""

    save_model: bool = True
    """Write the pruned model into ``output/model``."""
    save_dtype: SaveDType = "auto"
    """Dtype of the pruned checkpoint's weights. ``auto``: the source checkpoint's, whatever the compute
    precision (kept weights are the source's values exactly; refit projections are computed in float32
    and rounded once to it). ``float32``, ``bfloat16`` or ``float16`` convert on save."""
    export_gguf: GGUFType | None = None
    """Also write ``output/model.gguf`` for llama.cpp / Ollama in this type (llama.cpp's ``deci`` architecture:
    per-layer head and FFN widths; see ``gp-lightning export-gguf``). Needs ``save_model`` or ``streamed_surgery``."""
    streamed_surgery: bool = False
    """Write the pruned checkpoint by streaming the original safetensors files tensor by tensor (peak memory
    about one shard) instead of slicing the model in memory."""
    extreme_rate: float = 0.9
    """A layer (or one of its blocks) losing more than this fraction is reported as extreme in
    ``analysis/gradient_diagnosis.json``, with recommendations."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_config(0.0 < self.extreme_rate <= 1.0, "extreme_rate", self.extreme_rate, "must be in (0, 1]")
        check_config(self.export_gguf is None or self.save_model or self.streamed_surgery, "export_gguf",
                     self.export_gguf, "converts the saved model/: set save_model: true")


@dataclass
class RecoveryConfig:
    """Recovery fine-tuning after pruning"""

    finetune: bool = False
    """After pruning, recover the pruned model with a fine-tune (LoRA by default) into ``output/finetune``
    (see ``train.py``). This run's data, evaluation, precision, strategy and seed keys are passed on;
    ``finetune_config`` adds or overrides fine-tuning keys."""
    finetune_config: str | None = None
    """A ``train.py`` YAML (e.g. ``configs/finetune-lora.yaml``) with the fine-tuning keys for ``finetune``
    (its ``model`` and ``output`` are set by this run)."""

    def __post_init__(self) -> None:
        check_config(self.finetune or not self.finetune_config, "finetune_config", self.finetune_config,
                     "only applies with finetune: true (pass --finetune)")


@grouped
class PruneConfig(GroupedConfig):
    """Global structured pruning of a Llama-style decoder (GQA groups and MLP channels)."""

    source: ModelConfig
    data: DataConfig
    calibration: CalibrationConfig
    table: TableConfig
    selection: SelectionConfig
    search: SearchConfig
    refit: CompensationConfig
    evaluation: EvaluationConfig
    run: OutputConfig
    distributed: DistributedConfig
    recovery: RecoveryConfig

    def __post_init__(self) -> None:
        check_capability(self.calibration.importance_method, self.distributed.strategy,
                         self.calibration.statistics_checkpoints)
        check_config(not (self.recovery.finetune and self.table.table_only), "finetune", self.recovery.finetune,
                     "needs a pruned model, which table_only does not make")
        check_config(not self.refit.compensation_offload or self.run.streamed_surgery, "compensation_offload",
                     True, "needs streamed_surgery: true (in-memory surgery would hold the whole model)")
        check_config(not (self.refit.compensation_offload and self.selection.allocation == "search"
                          and not self.search.search_widths), "allocation", "search",
                     "runs the whole dense model in every process, which compensation_offload: true avoids: use "
                     "allocation: global, or re-apply a search's widths with search_widths")
        if self.recovery.finetune:
            self.finetune_settings()  # read and validate the fine-tuning keys now, not after pruning

    def finetune_settings(self) -> FinetuneConfig:
        """The fine-tuning config of ``finetune``: shared keys of this run, then ``finetune_config``."""
        flat = self.to_dict()
        values: dict[str, Any] = {key: flat[key] for key in SHARED_WITH_PRUNE} | {"teacher": self.source.model}
        path_text = self.recovery.finetune_config
        if path_text:
            path = Path(path_text).expanduser()
            check_config(path.is_file(), "finetune_config", path_text, "must be an existing YAML file")
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            unknown = sorted(set(loaded) - set(FinetuneConfig.key_owners()))
            check_config(not unknown, "finetune_config", path_text,
                         f"has unknown keys {unknown} (train.py --help lists the keys)")
            values |= loaded
        run = Path(self.run.output)
        return FinetuneConfig.from_flat(values | {"model": str(run / "model"), "output": str(run / "finetune"),
                                                  "overwrite": self.run.overwrite})


__all__ = ["FLAG_ALIASES", "OutputConfig", "PruneConfig", "RecoveryConfig"]
