"""The math of compensation, on one projection: y = W x + b, some input columns of W removed.

Everything works on the Gram matrix of the projection's inputs over the calibration tokens,
augmented with a constant 1 (``G = sum [x; 1] [x; 1]^T``), in float64: it holds the means (for a
bias) and the second moments (for a refit), and every output error is a quadratic form in it.

- ``none``: keep ``W[:, S]`` (S: the kept columns) and ``b``.
- ``bias`` (FLAP): keep ``W[:, S]``; the bias takes the removed inputs' mean contribution,
  ``b + W[:, R] mean(x_R)``, so the output mean is unchanged.
- ``least_squares``: ``[W_S', b'] = [W_S, b] + W_R G[R, K] (G[K, K] + lambda D)^-1`` with K = S and the
  constant, R the removed columns: the refit minimizing the output error over the calibration tokens, with a
  ridge that pulls the kept weights toward the dense ones (a few thousand tokens are few for a
  down_proj with thousands of inputs; shrinking toward zero instead measured worse). ``lambda`` is
  ``damping`` times the mean diagonal of ``G[S, S]`` and D is the identity on the feature columns
  (the constant is not damped). A system that is not positive definite gets 10x the damping, up to
  three times; a refit whose error is not below the bias-only error falls back to that (and that to
  ``none``), so compensation never increases the calibration-set output error.

:func:`obs_removals` picks which units to remove from a block so that the refit absorbs the loss
best: greedy structured OBS on the inverse Gram (a unit's error is ``tr(W_Q (Hinv_QQ)^-1 W_Q^T)``),
several units per step, the inverse updated by the Schur complement after each step (in float32:
it only ranks units).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Retries of a non-positive-definite system, each with 10x the damping.
_RETRIES = 3
#: Greedy OBS takes a block's units in about this many steps: one unit per step up to 256 units, then
#: ceil(count / 256) per step. Scores go stale within a step; on SmolLM2 at 20% (the quality benchmark's
#: protocol), 16 steps gave PPL 87.00, 64 gave 86.30, 256 gave 85.35 and one unit per step 85.44 (for 2.9x the
#: compensation time of 256 steps): 256 is as good as the exact greedy walk, each step costs a pass over the weights.
OBS_STEPS = 256


@dataclass
class Refit:
    """The compensated projection: the kept columns' weights, the output bias, and how well it fits."""

    weight: torch.Tensor  # out x |S|, float64
    bias: torch.Tensor  # out, float64 (the full output bias: the old one, changed)
    method: str  # what was applied: none | bias | least_squares
    error_before: float  # relative output error of plain slicing
    error_after: float  # relative output error of this refit
    damping: float = 0.0  # the ridge term used (least squares)
    fallback: str | None = None  # why the asked method was not applied


@dataclass
class Objective:
    """``min_V sum_t ||y_t - V xa_t[K]||^2`` over the calibration tokens with ``y = [W, b] xa`` (the layer's own
    output), held as sums: ``gram = sum xa xa^T`` and ``total = sum ||y||^2`` (the product ``W_R G[R, K]`` a refit
    needs is formed when one asks for it).

    Every error below is a closed form in these sums (no product over the tokens, no second pass over
    ``G``): slicing leaves ``W_R x_R``, the bias-only fit its centred part, and the ridge solution's
    normal equations turn its quadratic term into an inner product with its right-hand side (:func:`_solve`).
    """

    target: torch.Tensor  # [W, b], float64
    gram: torch.Tensor
    total: float

    @classmethod
    def of_layer(cls, weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor) -> Objective:
        target = _augmented(weight, bias)
        # in the Gram's own precision: a float32 Gram (what the walk accumulates) holds six digits, and a
        # float64 product of it would cost twice the time for digits it does not have
        return cls(target, gram, _energy(target.to(gram.dtype), gram))

    def lost(self, removed: torch.Tensor, index: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``W_R G[R, index]`` (float64, or ``dtype``): what the removed columns contributed, correlated with the
        kept ones (``index``): the right-hand side of a refit's correction (:func:`_solve`). Only the removed
        columns' weights enter: at 20% a fifth of down_proj's, a fifth of the products of ``[W, b] G[:, K]``."""
        weights = self.target[:, removed].to(self.gram.dtype)
        return (weights @ self.gram[removed][:, index]).to(dtype)

    def sliced_error(self, removed: torch.Tensor) -> float:
        """``sum ||W_R x_R||^2``: the error of keeping the other columns (and the bias) as they are."""
        w = self.target[:, removed]
        return float(((w @ self.gram[removed][:, removed].double()) * w).sum())

    def relative(self, error_squared: float) -> float:
        return (max(error_squared, 0.0) / self.total) ** 0.5 if self.total > 0 else 0.0


#: :func:`_energy` multiplies column blocks up to this wide whole.
_ENERGY_LEAF = 192


def _energy(target: torch.Tensor, gram: torch.Tensor, start: int = 0, stop: int | None = None) -> float:
    """``tr(T G T^T)`` over the columns ``start:stop`` of a symmetric ``G``, by halves: the off-diagonal block once
    (it counts twice), the diagonal ones the same way, blocks up to ``_ENERGY_LEAF`` columns whole. About half the
    products of the full matrix, in large products: 0.7x the time of 96-column block rows of the upper triangle
    for SmolLM2's down_proj (one thread)."""
    stop = gram.shape[0] if stop is None else stop
    if stop - start <= _ENERGY_LEAF:
        block = target[:, start:stop]
        return float(((block @ gram[start:stop, start:stop]) * block).sum(dtype=torch.float64))
    middle = (start + stop) // 2
    left, right = target[:, start:middle], target[:, middle:stop]
    off = float(((left @ gram[start:middle, middle:stop]) * right).sum(dtype=torch.float64))
    return 2 * off + _energy(target, gram, start, middle) + _energy(target, gram, middle, stop)


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[W, b]`` in float64 (a zero bias when there is none)."""
    weight = weight.detach().double()
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    return torch.cat([weight, bias[:, None]], dim=1)


def _solve(system: torch.Tensor, lost: torch.Tensor, damping: float) -> tuple[torch.Tensor, float, float] | None:
    """The ridge least-squares correction ``C`` of the kept weights and the bias, ``[W_K, b] + C`` the refit: the
    correction, the ridge term ``lam`` and how much it lowers the output error from slicing; None when the system
    stays indefinite. ``system``: ``G_KK``, the Gram of the kept columns then the constant (the caller gathers it
    once for all the dampings it solves); ``lost``: ``M = W_R G_RK`` (:meth:`Objective.lost`), in the precision to
    solve in (float64, or float32 when the caller only ranks candidates).

    The error of the refit is ``sliced - 2<C, M> + C G_KK C^T``; the ridge adds ``lam ||C D||^2`` (it pulls the kept
    weights toward the dense ones, not toward zero; the bias is not damped), so ``C (G_KK + lam D) = M`` and the
    error is ``sliced - <C, M> - lam ||C D||^2``: no product with ``G``, and small terms (the dense output's energy
    is not in it, so nothing cancels against it).
    """
    scale = float(system.diagonal()[:-1].mean()) if system.shape[0] > 1 else 0.0
    lam = damping * scale
    for _ in range(_RETRIES + 1):
        damped = system.to(lost.dtype, copy=True)
        damped.diagonal()[:-1] += lam
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            correction = torch.cholesky_solve(lost.T, chol).T
            ridge = lam * float(correction[:, :-1].square().sum(dtype=torch.float64))
            return correction, lam, float((correction * lost).sum(dtype=torch.float64)) + ridge
        lam = max(lam * 10, 1e-8 * max(scale, 1.0))
    return None


def _columns(kept: torch.Tensor, columns: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept input columns (long), the removed ones, and the kept ones followed by the constant (``columns``)."""
    kept = kept.to(torch.long)
    keep = torch.zeros(columns, dtype=torch.bool)
    keep[kept] = True
    return kept, torch.nonzero(~keep).flatten(), torch.cat([kept, torch.tensor([columns])])


def without_bias(gram: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The Gram matrix with the constant input decoupled (one token of it, uncorrelated with the features): every
    fit on it keeps a zero output bias, for a projection that has none and must not get one (stock Mistral and
    Qwen2 have no o_proj/down_proj bias)."""
    if bias is not None:
        raise ValueError("a projection with a bias keeps fitting it")
    decoupled = gram.clone()
    decoupled[-1] = 0
    decoupled[:, -1] = 0
    decoupled[-1, -1] = 1
    return decoupled


def refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, kept: torch.Tensor, method: str,
          damping: float = 0.01, objective: Objective | None = None, with_bias: bool = True) -> Refit:
    """Compensate a projection for removed input columns (all but ``kept``), as ``method`` says.

    Output errors are relative to the dense projection's output over the calibration tokens, from the
    sums of the objective (no product over the tokens is formed again). ``with_bias=False``: no output bias
    is added (see :func:`without_bias`).
    """
    if not with_bias:
        gram = without_bias(gram, bias)
        objective = None
    objective = objective or Objective.of_layer(weight, bias, gram)
    columns = objective.target.shape[1] - 1
    kept, removed, index = _columns(kept, columns)
    plain_values = objective.target[:, index]
    sliced = objective.sliced_error(removed)
    before = objective.relative(sliced)
    plain = Refit(plain_values[:, :-1], plain_values[:, -1], "none", before, before)
    tokens = float(gram[-1, -1])
    if method == "none" or len(kept) == columns or tokens <= 0:
        return plain
    if not with_bias:  # no bias-only candidate: least squares on the features alone, or slicing
        method, best = ("least_squares" if method == "least_squares" else "none"), plain
        if method == "none":
            return plain
    else:
        # bias only: the kept weights stay, the bias takes the mean of what the removed columns contributed
        shift = objective.target[:, removed] @ gram[removed, -1].double() / tokens
        flap_error = objective.relative(sliced - tokens * float(shift.square().sum()))
        best = (Refit(plain_values[:, :-1], plain_values[:, -1] + shift, "bias", before, flap_error)
                if flap_error <= before else plain)
        if method == "bias" or len(kept) == 0:  # with nothing kept, least squares is the bias
            return best
    solved = _solve(objective.gram[index][:, index], objective.lost(removed, index), damping)
    if solved is None:
        best.fallback = "the least-squares system is not positive definite even with 1000x the damping"
        return best
    correction, lam, gain = solved
    values = plain_values + correction
    error = objective.relative(sliced - gain)
    if error > best.error_after * (1 + 1e-9):
        best.fallback = f"least squares ({error:.4g}) did not lower the error below {best.method} ({best.error_after:.4g})"
        return best
    return Refit(values[:, :-1], values[:, -1], "least_squares", before, error, lam)


@dataclass
class _ObsWalk:
    """The result of greedy structured OBS: the removed units, the updated ``[W, b]`` and the objective it cost."""

    removed: list[int]
    target: torch.Tensor  # [W, b] after the OBS updates (float32): the ridge least-squares refit of the kept columns
    cost: float  # sum of the steps' (W'-W) H (W'-W)^T increases, H the damped Gram
    order: list[int]  # the removed units in the order the walk took them (a step's units by index)


def _walk_start(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, damping: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The walk's float32 ``[W, b]^T`` and the inverse of the damped Gram, padded to a multiple of 16."""
    columns = weight.shape[1]
    augmented = columns + 1
    # padded with identity rows and columns to a multiple of 16 (they never couple to the rest, and their weight
    # rows are zero): 1,537 wide, SmolLM2's down_proj and its constant, is factored and inverted 1.2x slower
    size = -(-augmented // 16) * 16
    # [W, b] transposed, a row per input column: the per-step update and the scores then run over contiguous
    # rows (3.6x faster for a 576 x 1,537 down_proj than over the columns)
    target = gram.new_zeros(size, weight.shape[0], dtype=torch.float32)
    target[:columns] = weight.detach().T
    if bias is not None:
        target[columns] = bias.detach()
    system = torch.nn.functional.pad(gram.float(), (0, size - augmented, 0, size - augmented))
    system.diagonal()[augmented:] = 1
    system.diagonal()[:columns] += damping * float(gram.diagonal()[:-1].mean()) + 1e-12
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info) != 0:  # not positive definite in float32 (no damping, near-singular data): factor in float64
        chol = torch.linalg.cholesky(system.double())
    inverse = torch.cholesky_inverse(chol).float()
    return target, inverse


def _obs_walk(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, unit_width: int, count: int,
              damping: float) -> _ObsWalk:
    """Remove ``count`` units greedily, several per step, updating the weights after each step (float32: a few
    thousand-wide system, the steps exact in theory).

    The constant input (the output bias) is a column that is never removed and not damped. With ``H = G + lam D``
    the updates minimize ``(W'-W) H (W'-W)^T`` with the removed columns zero: the output error plus ``lam`` times
    the distance to the dense weights, i.e. exactly the ridge refit of :func:`refit` for the chosen units.

    The inverse of ``H`` after each step is its Schur complement, ``Hinv - sum_s U_s V_s``. It is never formed:
    a step needs only the rows of the units it takes and the diagonal (blocks) the scores read, so the low-rank
    terms are applied to those (a rank-k update of the whole inverse per step costs ten times more, all memory
    traffic).
    """
    columns = weight.shape[1]
    units = columns // unit_width
    augmented = columns + 1
    target, inverse = _walk_start(weight, bias, gram, damping)
    unit_cols = torch.arange(columns).view(units, unit_width)
    blocks = inverse[unit_cols[:, :, None], unit_cols[:, None, :]]  # units x w x w: the diagonal blocks
    total = count * unit_width
    left = inverse.new_empty(inverse.shape[0], total)  # U: the taken columns of the inverse, step after step
    right = inverse.new_empty(total, inverse.shape[0])  # V: (Hinv_CC)^-1 Hinv_C of each step
    alive = torch.ones(units, dtype=torch.bool)
    removed: list[int] = []
    cost, done = 0.0, 0
    step = max(1, -(-count // OBS_STEPS))
    while len(removed) < count:
        scores = _obs_scores(target[:columns], blocks, alive)
        take = torch.topk(scores, min(step, count - len(removed)), largest=False, sorted=False).indices
        cols = take if unit_width == 1 else unit_cols[take].reshape(-1)
        rows = inverse[cols].addmm_(left[cols, :done], right[:done], alpha=-1)  # rows of the current inverse
        block = _spd_inverse(rows[:, cols])
        scaled = block @ rows
        taken = target[cols]  # W_C^T
        cost += float((block @ taken * taken).sum())  # tr(W_C (Hinv_CC)^-1 W_C^T)
        target.addmm_(scaled.T, taken, alpha=-1)  # the OBS update of the remaining weights
        width = len(cols)
        left[:, done : done + width] = rows.T  # the inverse is symmetric: its columns cols are these rows
        right[done : done + width] = scaled
        done += width
        # the diagonal blocks of the Schur complement: Hinv_QQ -= U_Q V_Q for every unit Q
        if unit_width == 1:
            blocks.view(-1).sub_((rows[:, :columns] * scaled[:, :columns]).sum(dim=0))
        else:
            blocks -= torch.bmm(rows.T[unit_cols], scaled[:, unit_cols].permute(1, 0, 2))
        alive[take] = False
        removed += sorted(take.tolist())
    target[unit_cols[~alive].reshape(-1)] = 0
    return _ObsWalk(sorted(removed), target[:augmented].T, cost, removed)


def obs_removals(weight: torch.Tensor, gram: torch.Tensor, unit_width: int, count: int, damping: float = 0.01,
                 bias: torch.Tensor | None = None, ordered: bool = False) -> list[int]:
    """The ``count`` units (consecutive blocks of ``unit_width`` input columns) whose removal, followed by a
    least-squares refit, costs the least output error (greedy structured OBS), by index; ``ordered``: in the order
    the walk removed them, so that every prefix is the walk's choice at that count (one walk visits every width)."""
    units = weight.shape[1] // unit_width
    if count <= 0:
        return []
    if count >= units:
        return list(range(units))
    walk = _obs_walk(weight, bias, gram, unit_width, count, damping)
    return walk.order if ordered else walk.removed


def obs_refit(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, unit_width: int, count: int,
              damping: float = 0.01, with_bias: bool = True, objective: Objective | None = None
              ) -> tuple[list[int], Refit]:
    """OBS's choice of ``count`` units and the least-squares refit of what remains, from one walk.

    The walk's final weights are the ridge refit (see :func:`_obs_walk`), so no second system is solved; its
    output error is the walk's cost less the ridge term. Falls back as :func:`refit` does when that error is not
    below the bias-only fit's (which only rounding can cause). ``with_bias=False``: no output bias is added.
    ``objective``: :meth:`Objective.of_layer` of the projection and ``gram`` if the caller has it (a later refit of
    the same projection then reuses it: it costs a product of the weights with the Gram); ignored without a bias.
    """
    if not with_bias:
        gram, objective = without_bias(gram, bias), None
    objective = objective or Objective.of_layer(weight, bias, gram)
    columns = weight.shape[1]
    units = columns // unit_width
    if count <= 0 or count >= units or float(gram[-1, -1]) <= 0:
        gone = list(range(units)) if count >= units else []
        kept = _kept_columns(units, unit_width, gone)
        return gone, refit(weight, bias, gram, kept, "least_squares", damping, objective, with_bias)
    walk = _obs_walk(weight, bias, gram, unit_width, count, damping)
    kept = _kept_columns(units, unit_width, walk.removed)
    # slicing and FLAP's bias (if a bias may be added): the errors to beat
    best = refit(weight, bias, gram, kept, "bias" if with_bias else "none", damping, objective)
    index = torch.cat([kept, torch.tensor([columns])])
    values = walk.target[:, index].double()
    lam = damping * float(gram.diagonal()[:-1].mean()) + 1e-12
    dense = objective.target[:, index]
    ridge = lam * float((values[:, :-1] - dense[:, :-1]).square().sum() +
                        objective.target[:, :-1].square().sum() - dense[:, :-1].square().sum())
    error = objective.relative(walk.cost - ridge)
    if error > best.error_after * (1 + 1e-6):
        best.fallback = f"least squares ({error:.4g}) did not lower the error below {best.method} ({best.error_after:.4g})"
        return walk.removed, best
    return walk.removed, Refit(values[:, :-1], values[:, -1], "least_squares", best.error_before, error, lam)


def unit_columns(units: list[int], width: int) -> torch.Tensor:
    """The input columns of ``units`` (each a block of ``width`` consecutive columns), in order."""
    return torch.tensor([u * width + i for u in units for i in range(width)], dtype=torch.long)


def _kept_columns(units: int, width: int, removed: list[int]) -> torch.Tensor:
    gone = set(removed)
    return unit_columns([u for u in range(units) if u not in gone], width)


def _spd_inverse(matrix: torch.Tensor) -> torch.Tensor:
    """The inverse of a symmetric positive definite matrix by its Cholesky factor (float64 LU if rounding made it
    indefinite). A positive 1 x 1 one (every step of an MLP walk of up to 256 units) directly: ``rsqrt(a)^2`` is
    bit for bit what LAPACK's factor and inverse give here (5,000 values and the whole compensation of SmolLM2
    compared), without their overhead (about 0.1 ms a call)."""
    if matrix.shape[0] == 1 and bool(matrix > 0):
        return matrix.rsqrt().square_()
    chol, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return torch.linalg.inv(matrix.double()).to(matrix.dtype)


def _obs_scores(rows: torch.Tensor, blocks: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """``tr(W_Q (Hinv_QQ)^-1 W_Q^T)`` for every unit Q still there (``rows``: ``W^T``, a row per input column;
    ``blocks``: the inverse's diagonal blocks, units x w x w; a removed unit's block is zero and its score infinite).

    The blocks are symmetric positive definite, so each score is ``||L_Q^-1 W_Q^T||^2`` with ``L_Q`` the block's
    Cholesky factor: no LU inverse (MKL's batched LU fails on 2 threads for three 192 x 192 blocks, SmolLM2's GQA
    groups, with "Pivots given to lu_solve must all be greater or equal to 1"). A block that rounding has made
    indefinite scores infinite: its unit is not removed by this step.
    """
    units, width, _ = blocks.shape
    if width == 1:  # one pass over the rows, then in place
        scores = torch.linalg.vector_norm(rows, dim=1).square_().div_(blocks.reshape(-1))
        return scores.masked_fill_(~alive, float("inf"))
    w = rows.view(units, width, rows.shape[1])  # units x w x out
    safe = torch.where(alive[:, None, None], blocks, torch.eye(width, dtype=blocks.dtype))
    chol, info = torch.linalg.cholesky_ex(safe)
    scores = torch.linalg.solve_triangular(chol, w, upper=False).square().sum(dim=(1, 2))
    return scores.masked_fill(info > 0, float("inf")).masked_fill(~alive, float("inf"))


#: The refit dampings held-out windows choose from, as multiples of ``compensation_damping``; bias-only (the limit of
#: an infinite damping: the kept weights stay the dense ones) and plain slicing are candidates too.
DAMPING_LADDER = (1.0, 3.0, 10.0, 30.0, 100.0)


#: :func:`held_out_choice` ranks the candidates on about this many output rows (see :func:`ranking_rows`).
RANKING_ROWS = 72


def ranking_rows(out: int) -> torch.Tensor:
    """The output rows the held-out windows rank the candidates on: every k-th, k = ``out // RANKING_ROWS`` (all
    rows of a projection with fewer than twice that). Deterministic and spread over the whole output, so the rows
    of every head and channel group take part; the damping that fits best is a property of the inputs' Gram, which
    every row shares, so a sample of rows ranks like all of them, and the ridge solves (their right-hand sides) and
    the held-out errors cost about ``rows / out`` of the full ones (72 of SmolLM2's 576: 0.36 s of a down_proj's
    ranking to 0.1 s, the five Cholesky factors of the kept Gram, the same for every row, being most of what is
    left)."""
    return torch.arange(0, out, max(1, out // RANKING_ROWS))


@dataclass
class HeldOut:
    """Which refit the held-out windows chose for one projection, and every candidate's held-out relative error
    (on the rows of :func:`ranking_rows` only)."""

    method: str  # none | bias | least_squares
    damping: float  # the multiple of the base damping (least squares), else 0
    errors: dict[str, float]
    chosen: str  # the key of ``errors`` chosen


def held_out_choice(weight: torch.Tensor, bias: torch.Tensor | None, train: torch.Tensor, held: torch.Tensor,
                    kept: torch.Tensor, method: str, damping: float, with_bias: bool = True) -> HeldOut:
    """Fit each candidate on the ``train`` windows' Gram and measure its output error on the ``held`` ones': plain
    slicing, FLAP's bias (if a bias may be added), and for ``least_squares`` the ridge refit at every damping of
    :data:`DAMPING_LADDER`. The lowest held-out error wins (ties: the simpler candidate).

    Every candidate is fit and measured on the same output rows, those of :func:`ranking_rows`, and its error is
    relative to the dense output of those rows. The candidates are only ranked here, in float32 (the chosen one is
    then solved on all rows and all windows): the ridge systems are solved in float32, and an error is
    ``tr(U G U^T)`` of the difference ``U`` between the dense ``[W, b]`` and the candidate (the removed columns'
    weights and minus the candidate's correction), which has no cancellation (``total - 2 <V, rhs> + V G V^T``
    loses the few digits that tell candidates apart)."""
    if not with_bias:
        train, held = without_bias(train, bias), without_bias(held, bias)
    rows = ranking_rows(weight.shape[0])
    weight, bias = weight[rows], None if bias is None else bias[rows]
    train, held = train.float(), held.float()
    kept, removed, index = _columns(kept, weight.shape[1])
    measure, fit_on = Objective.of_layer(weight, bias, held), Objective.of_layer(weight, bias, train)
    lost = measure.target.float()
    lost[:, index] = 0  # what slicing loses: the removed columns' weights

    def error(change: torch.Tensor) -> float:
        """The held-out relative error of the candidate ``[W_K, b] + change``."""
        difference = lost.clone()
        difference[:, index] = -change.float()
        return measure.relative(_energy(difference, held))

    plain, changes = fit_on.target[:, index], {}
    for name in ("none", "bias") if with_bias else ("none",):
        fit = refit(weight, bias, train, kept, name, damping, fit_on)
        if fit.method == name:  # a bias that does not lower the training error is not a candidate
            changes[name] = torch.cat([fit.weight, fit.bias[:, None]], dim=1) - plain
    if method == "least_squares" and len(kept) > 0:  # with nothing kept, least squares is the bias (as in refit)
        system, correlation = train[index][:, index], fit_on.lost(removed, index, torch.float32)
        for multiple in DAMPING_LADDER:
            solved = _solve(system, correlation, damping * multiple)
            if solved is not None:
                changes[f"least_squares@{multiple:g}"] = solved[0]
    errors = {name: error(change) for name, change in changes.items()}
    best = min(errors, key=lambda name: (errors[name], list(errors).index(name)))
    name, _, multiple = best.partition("@")
    return HeldOut(name, float(multiple or 0.0), errors, best)
