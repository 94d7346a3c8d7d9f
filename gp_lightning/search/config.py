"""The search group: how ``allocation: search`` chooses each block's width (see :mod:`gp_lightning.search`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from gp_lightning.runtime.errors import check_config


@dataclass
class SearchConfig:
    """Width search (allocation: search)"""

    search_generations: int = 24
    """Generations of the evolutionary search. Each makes ``search_offspring`` mutants of the best allocation
    so far and keeps the best of them only if it beats that allocation on every fitness window."""
    search_offspring: int = 8
    """Mutants per generation. They are ranked on few windows first and the best quarter goes on to more
    windows (multi-step selection, ``search_stage_windows``), so most cost one window's forward pass."""
    search_windows: int = 24
    """Windows the search measures on, drawn from ``dataset`` after the refit windows (so no refit fits them):
    every third is held out to choose the final allocation, the others measure fitness."""
    search_stage_windows: list[int] = field(default_factory=lambda: [1, 4])
    """Fitness windows of each selection stage before the last, which uses them all."""
    search_step: float = 0.0625
    """A mutation moves this fraction of the widest MLP's channels (or one GQA group) from one block to another at
    the start, halving four times over the generations (coarse to fine)."""
    search_cache_mb: int = 512
    """Memory for the refit layer variants the search has made (least recently used ones are made again when
    needed), and the bound on the hidden states it keeps so that a mutant runs only from its first changed layer
    (the best allocation's and the mutants' still in the running, for this rank's fitness windows; when they do not
    fit, every run starts at the first layer)."""
    search_widths: str | None = None
    """A run's ``analysis/search.json``: re-apply the widths that search chose instead of searching again (the
    model, ``pruning_ratio`` and limits must match; the units each block keeps are chosen as usual)."""

    def __post_init__(self) -> None:
        check_config(self.search_generations >= 0, "search_generations", self.search_generations, "must be >= 0")
        check_config(self.search_windows >= 1, "search_windows", self.search_windows, "must be at least 1")
        check_config(self.search_offspring >= 1, "search_offspring", self.search_offspring, "must be >= 1")
        check_config(all(w >= 1 for w in self.search_stage_windows), "search_stage_windows",
                     self.search_stage_windows, "lists window counts, each at least 1")
        check_config(0 < self.search_step <= 0.5, "search_step", self.search_step, "must be in (0, 0.5]")
        check_config(self.search_cache_mb >= 1, "search_cache_mb", self.search_cache_mb, "must be at least 1")
