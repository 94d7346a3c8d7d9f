"""The search's pure math: an allocation is the number of units every block keeps, under the exact budget.

Blocks are numbered ``0..L-1`` (each layer's attention, in GQA groups) then ``L..2L-1`` (each layer's MLP, in
channels). An allocation is feasible when it removes at least the target number of parameters, every block keeps
at least its floor (and at most its dense width), and every layer loses between its ``min_rate`` floor and its
rate cap. A mutation moves width from one block to another: the donor loses enough parameters to pay for what
the receiver gains, then the slack left over the target goes back to MLP blocks, so an allocation never removes
more than one MLP channel's parameters beyond the target (when a block can take them back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gp_lightning.model.layout import ModelLayout
from gp_lightning.selection.config import SelectionConfig
from gp_lightning.selection.plan import PruningPlan

#: Tries of a mutation (a move that breaks a layer's bounds is drawn again).
_TRIES = 20


@dataclass(frozen=True)
class Space:
    """Per block: the dense width, the fewest units it may keep and a unit's parameters; per layer: the most and
    the least parameters it may lose; the parameters to remove."""

    dense: np.ndarray  # 2L: units of each block when nothing is removed
    floor: np.ndarray  # 2L: the fewest units each block may keep
    cost: np.ndarray  # 2L: parameters of one unit
    cap: np.ndarray  # L: the most parameters a layer may lose
    need: np.ndarray  # L: the least parameters a layer must lose
    target: int

    @classmethod
    def of(cls, layout: ModelLayout, config: SelectionConfig, target: int) -> Space:
        limits = [config.limits(layout, layer) for layer in layout.layers]
        attention = [(x.num_kv_heads, x.num_kv_heads - lim.max_groups, layout.attention_group_cost(x))
                     for x, lim in zip(layout.layers, limits, strict=True)]
        mlp = [(x.intermediate_size, x.intermediate_size - lim.max_channels, layout.mlp_channel_cost(x))
               for x, lim in zip(layout.layers, limits, strict=True)]
        dense, floor, cost = (np.array(column) for column in zip(*attention, *mlp, strict=True))
        return cls(dense, floor, cost, np.array([lim.cap_params for lim in limits]),
                   np.array([lim.need_params for lim in limits]), target)

    @property
    def layers(self) -> int:
        return len(self.cap)

    def layer_removed(self, kept: np.ndarray) -> np.ndarray:
        """Parameters each layer loses."""
        lost = (self.dense - kept) * self.cost
        return lost[: self.layers] + lost[self.layers :]

    def removed(self, kept: np.ndarray) -> int:
        return int(((self.dense - kept) * self.cost).sum())

    def feasible(self, kept: np.ndarray) -> bool:
        lost = self.layer_removed(kept)
        return bool((kept >= self.floor).all() and (kept <= self.dense).all() and (lost <= self.cap).all()
                    and (lost >= self.need).all() and self.removed(kept) >= self.target)

    def of_plan(self, plan: PruningPlan) -> np.ndarray:
        """The allocation of a plan (the knapsack's or the uniform one)."""
        return np.array([len(lp.keep_groups) for lp in plan.layers] + [len(lp.keep_channels) for lp in plan.layers])


def mlp_step(space: Space, config_step: float, generation: int, generations: int) -> int:
    """Channels a mutation moves at ``generation``: ``config_step`` of the widest MLP, halved four times over the
    run (coarse to fine), at least one."""
    widest = int(space.dense[space.layers :].max()) if space.layers else 1
    halvings = math.floor(5 * generation / max(generations, 1)) if generations else 0
    return max(1, round(widest * config_step / 2 ** min(halvings, 4)))


def _units(space: Space, block: int, step: int) -> int:
    return 1 if block < space.layers else step


def _move(space: Space, kept: np.ndarray, rng: np.random.Generator, step: int) -> np.ndarray | None:
    """One move: a receiver block grows by a step (one group, or ``step`` channels), a donor block shrinks by the
    fewest units that pay for it; None when the draw breaks a bound."""
    can_grow = np.flatnonzero(kept < space.dense)
    can_shrink = np.flatnonzero(kept > space.floor)
    if len(can_grow) == 0 or len(can_shrink) == 0:
        return None
    receiver, donor = int(rng.choice(can_grow)), int(rng.choice(can_shrink))
    if receiver == donor:
        return None
    grow = min(_units(space, receiver, step), int(space.dense[receiver] - kept[receiver]))
    shrink = math.ceil(grow * space.cost[receiver] / space.cost[donor])
    if shrink > kept[donor] - space.floor[donor]:
        return None
    new = kept.copy()
    new[receiver] += grow
    new[donor] -= shrink
    return new if space.feasible(new) else None


def _repair(space: Space, kept: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give the parameters removed beyond the target back to MLP blocks, while one can take a channel (within its
    dense width and its layer's ``min_rate`` floor)."""
    mlp = np.arange(space.layers, 2 * space.layers)
    kept = kept.copy()
    while True:
        slack = space.removed(kept) - space.target
        spare = space.layer_removed(kept) - space.need  # what each layer may still give back
        room = np.minimum(space.dense[mlp] - kept[mlp], np.minimum(slack, spare) // space.cost[mlp])
        open_blocks = mlp[room > 0]
        if len(open_blocks) == 0:
            return kept
        block = int(rng.choice(open_blocks))
        kept[block] += int(room[block - space.layers])


def mutate(space: Space, kept: np.ndarray, rng: np.random.Generator, step: int) -> np.ndarray:
    """A feasible mutant of ``kept``: one to three moves, then the slack given back (``kept`` itself when no move
    fits)."""
    moves = int(rng.integers(1, 4))
    new = kept
    for _ in range(_TRIES):
        moved = _move(space, new, rng, step)
        if moved is not None:
            new = moved
            moves -= 1
            if moves == 0:
                break
    return _repair(space, new, rng)
