"""``allocation: search``: the widths of every block chosen by evolutionary search on the real loss.

Setup builds the variant database (:mod:`.variants`) and measures the seeds, the knapsack's allocation and the
uniform one, on the fitness windows; the best seed is the first parent. Each generation (a (1 + lambda) step
with EvoPress's multi-step selection) mutates the parent ``search_offspring`` times (:mod:`.evolution`), ranks
the mutants on one window, then the best quarter on more windows, and the best of those on every fitness window
against the parent, which it replaces only if its KL is lower there: the fitness of the result is never above a
seed's. The variants are refit on the refit windows (the ones compensation refits on), and the fitness is measured
on other windows of the same text (``search_windows`` more are drawn), so it measures how an allocation's refits
generalize, not how well they fit; every third of those is held out, and the held-out windows finally choose
among the last parents and the seeds. After each generation the state (the parent, the generator's state, the
history and the database's removal orders) is written as safetensors + JSON, so ``--resume`` continues a killed
search to the result an uninterrupted one gives. The same numbers in the same order on every rank make every
rank take the same decisions.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from gp_lightning.calibration.statistics_checkpoint import read_state, windows_hash, write_state
from gp_lightning.compensation.config import CompensationConfig
from gp_lightning.compensation.layerwise import Batches, first_layer_inputs
from gp_lightning.model.layout import ModelLayout
from gp_lightning.runtime.errors import ConfigError
from gp_lightning.search import variants
from gp_lightning.search.config import SearchConfig
from gp_lightning.search.evolution import Space, mlp_step, mutate
from gp_lightning.search.fitness import Candidates, Fitness
from gp_lightning.selection.config import SelectionConfig
from gp_lightning.selection.plan import PruningPlan

log = logging.getLogger("gp_lightning")

#: Every this-many-th search window is held out to choose the final allocation.
HELD_EVERY = 3
#: How many of the last parents the held-out windows choose among (with the seeds).
FINALISTS = 3


@dataclass
class SearchInputs:
    """What the search needs: the dense model, the table, the seeds' plans, the refit windows, the search's own
    windows (fitness and held out) and the settings."""

    model: nn.Module
    layout: ModelLayout
    table: pd.DataFrame
    seeds: dict[str, PruningPlan]
    windows: torch.Tensor
    search_windows: torch.Tensor
    target: int
    selection: SelectionConfig
    refit: CompensationConfig
    search: SearchConfig
    batch_size: int = 4
    seed: int = 42
    state_path: Path | None = None
    resume: bool = False
    rank: int = 0
    world: int = 1


@dataclass
class SearchResult:
    """The chosen allocation (units per block) and what ``analysis/search.json`` reports."""

    kept: np.ndarray
    report: dict[str, Any]


def split_windows(count: int) -> tuple[list[int], list[int]]:
    """(fitness, held-out) positions of the search windows: every ``HELD_EVERY``-th held out (none of fewer)."""
    held = [i for i in range(count) if i % HELD_EVERY == HELD_EVERY - 1] if count >= HELD_EVERY else []
    return sorted(set(range(count)) - set(held)), held


def _settings(inputs: SearchInputs) -> dict[str, Any]:
    """What a resumed search must share with the interrupted one."""
    return {"windows": windows_hash(torch.cat([inputs.windows.flatten(), inputs.search_windows.flatten()])),
            "target": inputs.target, "seed": inputs.seed,
            "offspring": inputs.search.search_offspring, "stage_windows": list(inputs.search.search_stage_windows),
            "step": inputs.search.search_step, "generations": inputs.search.search_generations,
            "within_layer": inputs.refit.within_layer, "compensation": inputs.refit.compensation,
            "damping": inputs.refit.compensation_damping, "bias": inputs.refit.compensation_bias}


def _load_state(inputs: SearchInputs) -> dict[str, Any] | None:
    """The saved state of an interrupted search (``--resume``), refused in one line when its settings differ."""
    path = inputs.state_path
    if not inputs.resume or path is None or not path.is_file():
        return None
    header, state = read_state(path)
    saved, mine = header.get("settings", {}), _settings(inputs)
    differ = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if differ:
        raise ConfigError(f"resume: the search state {path} was written with other settings ({', '.join(differ)}): "
                          "resume with the interrupted run's settings, or start again with --overwrite.")
    log.info("search resumed from %s at generation %d", path, state["generation"])
    return state


class _Search:
    """One search: the database, the fitness, the state, and the steps that change it."""

    def __init__(self, inputs: SearchInputs) -> None:
        self.inputs = inputs
        self.space = Space.of(inputs.layout, inputs.selection, inputs.target)
        self.fit, self.held = split_windows(inputs.search_windows.shape[0])
        self.fitness = Fitness(inputs.model, inputs.search_windows, inputs.rank, inputs.world,
                               inputs.search.search_cache_mb * 2**20, self.fit)
        saved = _load_state(inputs)
        self.database = self._database(None if saved is None else saved["orders"])
        self.candidates = Candidates(self.database)
        self.rng = np.random.default_rng(inputs.seed)
        self.state: dict[str, Any] | None = None
        self.measured: dict[bytes, dict[int, float]] = {}  # this generation's KL per allocation and window
        try:
            self.state = saved if saved is not None else self._start()
            self.rng.bit_generator.state = self.state["rng"]
            self.accept(np.array(self.state["parent"]), start=0)  # the parent's states, kept
        except BaseException:
            self.candidates.restore()  # the model dense again, whatever stopped the search
            raise

    def _database(self, orders: list[torch.Tensor] | None) -> variants.Database:
        inputs = self.inputs
        directory = None if inputs.state_path is None else inputs.state_path.parent / "search_variants"
        grams = variants.GramStore(inputs.layout.num_layers, directory, inputs.rank)

        def batches() -> Batches:
            mine = torch.tensor(self.fitness.mine(range(inputs.windows.shape[0])), dtype=torch.long)
            return first_layer_inputs(inputs.model, inputs.windows[mine], torch.ones(len(mine)), inputs.batch_size)

        known = None if orders is None else [o.tolist() for o in orders]
        return variants.build(inputs.model, inputs.layout, batches, self.space.floor.tolist(), inputs.refit,
                              inputs.table, inputs.search.search_cache_mb * 2**20, grams, known)

    def evaluate(self, kept: np.ndarray, which: list[int]) -> float:
        """KL of allocation ``kept`` on windows ``which``: each window run once per generation (a later stage reuses
        the windows an earlier one ran; the figures do not depend on the run), from the first layer that differs
        from the parent's, its states kept for :meth:`accept`."""
        known = self.measured.setdefault(kept.tobytes(), {})
        missing = [w for w in which if w not in known]
        if missing:
            self.candidates.apply(kept)
            # states kept for a mutant that may become the parent (not for the seeds, nor held-out windows)
            key = kept.tobytes() if self.state is not None and set(missing) <= set(self.fit) else None
            known.update(zip(missing, self.fitness.per_window(missing, self._start_layer(kept), key), strict=True))
        return float(np.mean([known[w] for w in which])) if which else 0.0

    def _start_layer(self, kept: np.ndarray) -> int:
        parent = kept if self.state is None else np.array(self.state["parent"])  # seeds: from the start
        differs = np.flatnonzero((kept != parent).reshape(2, -1).any(axis=0))
        return int(differs[0]) if len(differs) else 0

    def accept(self, kept: np.ndarray, start: int | None = None) -> None:
        """``kept`` becomes the parent: its states of every fitness window are kept (the missing ones run now, from
        layer ``start``, by default its first that differs from the parent's)."""
        key = kept.tobytes()
        self.candidates.apply(kept)
        self.fitness.keep_states(key, self._start_layer(kept) if start is None else start)
        self.fitness.accept(key)
        self.state["parent"] = kept.tolist()

    def _start(self) -> dict[str, Any]:
        """Generation 0: the seeds measured on the fitness windows, the best one the parent."""
        seeds = {}
        for name, plan in self.inputs.seeds.items():
            kept = self.space.of_plan(plan)
            if self.space.feasible(kept):
                seeds[name] = {"kept": kept.tolist(), "fitness": self.evaluate(kept, self.fit)}
            else:
                log.info("search: the %s allocation breaks a limit of this run; it is not a seed", name)
        if not seeds:
            raise ConfigError("allocation: search has no seed that meets this run's limits (min_rate, max_rate, "
                              "protected_layers, ...): relax them, or use allocation: global.")
        best = min(seeds, key=lambda name: seeds[name]["fitness"])
        return {"generation": 0, "parent": seeds[best]["kept"], "fitness": seeds[best]["fitness"], "seeds": seeds,
                "history": [], "parents": [dict(seeds[best])], "rng": self.rng.bit_generator.state,
                "orders": [torch.tensor(o, dtype=torch.long) for o in self.database.orders], "seconds": 0.0}

    def _stages(self, pool: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Multi-step selection: the best quarter of each stage goes on; the best on every fitness window."""
        for count in self.inputs.search.search_stage_windows:
            if count >= len(self.fit) or len(pool) == 1:
                break
            scores = [self.evaluate(k, self.fit[:count]) for k in pool]
            pool = [pool[i] for i in np.argsort(scores, kind="stable")[: max(1, len(pool) // 4)]]
            self.fitness.drop_except({k.tobytes() for k in pool})  # the states of the mutants that go no further
        scores = [self.evaluate(k, self.fit) for k in pool]
        best = int(np.argmin(scores))
        return pool[best], scores[best]

    def generation(self) -> dict[str, Any]:
        """One generation: mutants of the parent, the best of them kept if it beats the parent."""
        state, cfg, start = self.state, self.inputs.search, time.perf_counter()
        parent = np.array(state["parent"])
        step = mlp_step(self.space, cfg.search_step, state["generation"], cfg.search_generations)
        pool: dict[bytes, np.ndarray] = {}
        self.measured = {}
        for _ in range(cfg.search_offspring):
            child = mutate(self.space, parent, self.rng, step)
            if not np.array_equal(child, parent):
                pool.setdefault(child.tobytes(), child)
        entry: dict[str, Any] = {"generation": state["generation"], "step": step, "mutants": len(pool)}
        if pool:
            best, fitness = self._stages(list(pool.values()))
            entry["best_mutant"] = fitness
            if fitness < state["fitness"]:
                self.accept(best)
                state["fitness"] = fitness
                state["parents"] = [*state["parents"][-(FINALISTS - 1):], {"kept": best.tolist(), "fitness": fitness}]
            self.fitness.pending = {}
        entry |= {"fitness": state["fitness"], "seconds": time.perf_counter() - start}
        state["history"].append(entry)
        state["generation"] += 1
        state["rng"] = self.rng.bit_generator.state
        state["seconds"] += entry["seconds"]
        return entry

    def save(self) -> None:
        if self.inputs.rank == 0 and self.inputs.state_path is not None:
            write_state(self.inputs.state_path, {"settings": _settings(self.inputs)}, self.state)

    def finalists(self) -> dict[str, dict[str, Any]]:
        """The last parents and the seeds (allocation and fitness), without repeats, the final parent first."""
        named = {f"search-{i}": parent for i, parent in enumerate(reversed(self.state["parents"]))}
        named |= self.state["seeds"]
        unique: dict[tuple[int, ...], str] = {}
        for name, entry in named.items():  # a parent that is a seed goes by the seed's name
            if tuple(entry["kept"]) not in unique or not name.startswith("search-"):
                unique[tuple(entry["kept"])] = name
        return {name: named[name] for name in unique.values()}

    def choose(self) -> tuple[str, dict[str, Any], dict[str, float]]:
        """The finalist with the lowest KL on the held-out windows (the final parent without held-out windows)."""
        finalists = self.finalists()
        if not self.held:
            first = next(iter(finalists))
            return first, finalists[first], {}
        held = {name: self.evaluate(np.array(entry["kept"]), self.held) for name, entry in finalists.items()}
        best = min(held, key=lambda name: (held[name], list(held).index(name)))
        return best, finalists[best], held


def _report(search: _Search, name: str, chosen: dict[str, Any], held: dict[str, float], seconds: float
            ) -> dict[str, Any]:
    space, state, kept = search.space, search.state, np.array(chosen["kept"])
    layers = space.layers

    def widths(k: np.ndarray | list[int]) -> dict[str, list[int]]:
        return {"attention_groups": [int(x) for x in k[:layers]], "mlp_channels": [int(x) for x in k[layers:]]}

    return {
        "chosen": {"from": name, **widths(kept), "removed_params": space.removed(kept), "target_params": space.target,
                   "fitness": chosen["fitness"], "held_out": held.get(name)},
        "seeds": {seed: {**widths(v["kept"]), "fitness": v["fitness"], "held_out": held.get(seed)}
                  for seed, v in state["seeds"].items()},
        "history": state["history"], "held_out": held,
        "windows": {"refit": search.inputs.windows.shape[0], "fitness": search.fit, "held_out": search.held},
        "variants_made": search.database.made, "window_passes": search.fitness.evaluations,
        "seconds": seconds, "settings": _settings(search.inputs) | {"windows": None},
    }


#: glibc's ``mallopt`` parameter for the mmap threshold, and the threshold the search sets.
_M_MMAP_THRESHOLD, _MMAP_BYTES = -3, 2**20


def _heap(trim: bool = False) -> None:
    """Keep the fitness runs' large temporaries (SmolLM2's logits: 25 MB) out of the heap, and give freed heap memory
    back (``trim``). glibc raises its mmap threshold as large blocks are freed, so later ones came from the heap and
    stayed: the search's peak RSS grew by about 150 MB a generation (4.4 GB after 24 generations; 2.3 GB after 4
    with a fixed 1 MB threshold, 3.0 GB without). Nothing on other C libraries."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        if trim:
            libc.malloc_trim(0)
        else:
            libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_BYTES)


def search_allocation(inputs: SearchInputs) -> SearchResult:
    """Search the widths of every block (see the module's doc); the model is dense again when it returns."""
    start = time.perf_counter()
    _heap()
    search = _Search(inputs)
    try:
        search.save()
        cfg = inputs.search
        bar = tqdm(total=cfg.search_generations, initial=search.state["generation"], desc="Search",
                   unit="generation", disable=inputs.rank != 0)
        while search.state["generation"] < cfg.search_generations:
            entry = search.generation()
            search.save()
            _heap(trim=True)
            bar.set_postfix(kl=f"{entry['fitness']:.4f}")
            bar.update()
        bar.close()
        name, chosen, held = search.choose()
        report = _report(search, name, chosen, held, time.perf_counter() - start)
    finally:
        search.candidates.restore()
    search.database.grams.remove()  # kept only for a resume
    kept = np.array(chosen["kept"])
    log.info("search: %s chosen, KL %.4f on the fitness windows (seeds: %s), %d variants, %.1f s", name,
             report["chosen"]["fitness"], ", ".join(f"{k} {v['fitness']:.4f}" for k, v in report["seeds"].items()),
             report["variants_made"], report["seconds"])
    return SearchResult(kept, report)
