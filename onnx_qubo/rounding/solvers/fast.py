"""The fast engine: every neuron of a layer at once, with matrix operations on the shared Gram.

Neuron i minimizes ``E_i(v) = e^T G e + 2 c_i . e`` with ``e = p_i * (u_i - v)`` over binary v
on its free variables (``u_i`` = frac, ``p_i`` = the variables' output step, ``c_i`` = cross:
see qubo.py; the constant offset does not change the minimizer). Three stages, all batched
over neurons:

1. Start: sequential rounding with error feedback (GPTQ's Cholesky form of the nearest-plane
   algorithm), each weight restricted to its floor or ceiling (with ``--levels`` above 2, the
   nearest of its levels), in float32; kept per neuron where it beats round-to-nearest (and the
   final choice is never worse than it, exactly). With more levels, each chunk first solves the
   floor-or-ceiling restriction (all three stages, on the weights' Gram) and starts from the
   better of that and the sequential start: the levels never end above the binary rounding.
2. Descent: best-improvement single flips; when none pays, the best pair among each neuron's
   most promising flips. A move costs a row of G read from memory and a few passes over the
   neuron's variables, so the bulk of the moves is made in float32 (half the bytes); then the
   residual is recomputed exactly and the descent goes on in float64 until no move pays.
3. Iterated tabu search: every neuron keeps flipping its best non-tabu variable (uphill moves
   allowed, recent flips forbidden for a random tenure), remembering its best state; after a
   round without improvement it restarts from its best with a small random kick; then descent
   again from the best states. Small layers run several replicas of each neuron at once.

For ``r = G e + c``, flipping v_j by d = 1 - 2 v_j changes E by ``p_j^2 G_jj - 2 d p_j r_j`` and
r by ``-d p_j G[:, j]``: a move costs O(m) per neuron, a step over all neurons O(n m).

Everything, matrix products included, runs on ``workers`` chunk threads, each chunk's BLAS
calls single-threaded (``determinism.one_blas_thread``): BLAS's result can depend on its thread
count, which must not decide a rounding, and its own threads spinning beside the chunk threads
would starve them (the start's inner batches use einsum, which does not call BLAS).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import pairwise

import numpy as np

from ...core.determinism import one_blas_thread
from ...core.progress import Progress
from ..qubo import LayerProblem

TOLERANCE = 1e-12  # relative to the neuron's energy scale: smaller gains are noise
ROUGH_TOLERANCE = 1e-5  # the same in float32, well above its rounding (~1e-7 per move, over hundreds of moves)
ROUGH_FLOOR = 1e-30  # float32 stops resolving gains near 1e-38: a neuron on a smaller scale waits for float64
ROUGH_STEPS = 4  # the float32 stage stops after this many steps per variable (float64 then ends the descent)
MIN_TABU_STEPS = 16  # a shorter tabu round cannot climb out of a minimum: skip the stage
MIN_ROWS_PER_WORKER = 32  # below this, a thread's overhead outweighs its share of the work
CHUNK_SPLIT = 2  # a layer is cut in (at least) 2 chunks, whatever the machine: results do not depend on it
REPLICA_ELEMENTS, MAX_REPLICAS = 1 << 14, 8  # layers under 2^14 weights are searched in replicas
KICK_FLIPS = 8  # a restart flips a fifth of a neuron's free weights, but about 8 at most
DESCENT_ELEMENTS = 1 << 16  # variables per descent block: a step's arrays fit in a core's L2 cache


class FastSolver:
    """Batched start + descent + tabu; deterministic for a given ``seed`` (tabu tenures).

    Neurons are solved in chunks (at most ``chunk_bytes`` of working memory each, and
    ``CHUNK_SPLIT`` chunks once there are ``MIN_ROWS_PER_WORKER`` neurons per chunk), in
    ``workers`` parallel threads: numpy releases the GIL in its array loops, so the element-wise
    work of the descent and the tabu search uses every core (BLAS on one thread: see the
    module's docstring). Chunk k
    draws its random numbers from ``default_rng([seed, k])`` and the chunks do not depend on
    ``workers``, so results depend on neither timing nor the machine; ``split`` and
    ``solve_part`` solve runs of chunks apart (onnx_qubo/rounding/workers.py) with the same result.
    ``pair_candidates`` is how many of each neuron's best single flips are paired. A tabu round
    lasts ``tabu_work / (neurons * inputs)`` steps (at most 1024), so small layers search long
    and wide ones stay fast; a layer too wide for 16 steps skips the tabu stage.
    ``tabu_rounds`` caps the rounds, ``tabu_patience`` is how many rounds in a row without
    improvement end a neuron's search. ``effort`` multiplies all three (``--effort``): longer
    rounds, more restarts, more patience; the same bits for the same effort.
    """

    name = "fast"

    def __init__(self, chunk_bytes: int = 256 << 20, pair_candidates: int = 48,
                 tabu_work: int = 1 << 22, tabu_rounds: int = 4, tabu_patience: int = 2,
                 workers: int | None = None, effort: int = 1):
        self.chunk_bytes = chunk_bytes
        self.pair_candidates = pair_candidates
        self.tabu_work = tabu_work * effort
        self.tabu_rounds = tabu_rounds * effort
        self.tabu_patience = tabu_patience * effort
        self.workers = workers or os.cpu_count() or 1
        self.params = {"effort": effort} if effort != 1 else {}  # what a worker process builds it with

    def plan(self, n: int, f: int) -> FastPlan:
        """How a layer of n neurons with f variables is searched: replicas, tabu round length,
        and its chunks of (replicated) rows."""
        # Small layers cost numpy's per-call overhead, not arithmetic: search each neuron from
        # several replicas at once (their random tenures and kicks differ), keep the best.
        replicas = int(np.clip(REPLICA_ELEMENTS // max(n * f, 1), 1, MAX_REPLICAS))
        tabu_steps = min(1024, self.tabu_work // max(n * replicas * f, 1))
        rows = n * replicas
        by_memory = max(1, int(self.chunk_bytes // (8 * f * 8)))
        size = min(by_memory, max(MIN_ROWS_PER_WORKER, -(-rows // CHUNK_SPLIT)))
        return FastPlan(replicas, tabu_steps, tuple(slice(start, min(start + size, rows))
                                                    for start in range(0, rows, size)))

    def solve(self, problem: LayerProblem, seed: int = 0, progress: Progress = Progress()) -> np.ndarray:
        return self.solve_part(problem, seed, problem.shape[0], 0, progress)

    def solve_part(self, part: LayerProblem, seed: int, layer_rows: int, first_chunk: int,
                   progress: Progress = Progress(), upper: np.ndarray | None = None) -> np.ndarray:
        """Solve the neurons of consecutive chunks ``first_chunk, ...`` of ``plan(layer_rows, f)``:
        ``part`` holds exactly their rows (the whole layer when first_chunk is 0 and part has
        ``layer_rows`` rows). Gives those rows' choice, the same bits as solving the whole layer,
        whatever this process's BLAS thread count. ``upper``: ``start_factor(part)`` when the
        caller has it already."""
        with one_blas_thread():
            return self._solve_part(part, seed, layer_rows, first_chunk, progress, upper)

    def _solve_part(self, part: LayerProblem, seed: int, layer_rows: int, first_chunk: int,
                    progress: Progress, upper: np.ndarray | None) -> np.ndarray:
        n, f = part.shape
        gram = part.gram
        plan = self.plan(layer_rows, f)
        replicas = plan.replicas
        if replicas > 1 and (first_chunk or n != layer_rows):
            raise ValueError("a layer searched in replicas is solved whole")
        # float32 for the start and the descent's first stage: they guide the search, and the
        # float64 stage that ends it decides
        rough_upper = (start_factor(part) if upper is None else upper).astype(np.float32)
        rough_gram = gram.astype(np.float32)
        step, frac, free, cross = (np.broadcast_to(part.step, (n, f)), part.rounding.frac,
                                   part.rounding.free, part.cross)
        if replicas > 1:
            step, frac, free, cross = (np.repeat(a, replicas, axis=0) for a in (step, frac, free, cross))
        origin = plan.chunks[first_chunk].start
        chunks = []
        for k in range(first_chunk, len(plan.chunks)):
            if plan.chunks[k].start - origin >= n * replicas:
                break
            chunks.append((k, slice(plan.chunks[k].start - origin, plan.chunks[k].stop - origin)))
        if chunks[-1][1].stop != n * replicas:
            raise ValueError(f"rows {origin}..{origin + n} of the layer do not end on a chunk boundary")
        terms = [_Terms(gram, rough_gram, step[rows], frac[rows], free[rows], cross[rows]) for _, rows in chunks]
        digits = part.rounding.digits

        def search(chunk: _Terms, start: np.ndarray, rng: np.random.Generator, tabu_steps: int) -> np.ndarray:
            """Descent and tabu from the better of ``start`` and round-to-nearest; never worse
            than round-to-nearest, exactly (the start was chosen in float32)."""
            state, nearest, nearest_energy = best_start(chunk, start)
            state.descend(self.pair_candidates)
            if tabu_steps >= MIN_TABU_STEPS:
                state.reset(tabu_search(state, tabu_steps, self.tabu_rounds, rng, self.tabu_patience))
                state.descend(self.pair_candidates)
            return np.where((state.energy <= nearest_energy)[:, None], state.choice, nearest)

        def solve_chunk(index: int) -> np.ndarray:
            chunk, rng = terms[index], np.random.default_rng([seed, chunks[index][0]])
            start = sequential_start(chunk, rough_upper, digits)
            if len(digits) > 1:  # the floor-or-ceiling problem first: the levels never do worse than it
                binary, floor = chunk.floor_or_ceiling(len(digits))
                binary_choice = search(binary, sequential_start(binary, rough_upper),
                                       np.random.default_rng([seed, chunks[index][0], 1]),
                                       min(1024, plan.tabu_steps * len(digits)))
                lifted = unary(floor + binary_choice, len(digits))
                start = np.where((chunk.energies(lifted) < chunk.energies(start))[:, None], lifted, start)
            return search(chunk, start, rng, plan.tabu_steps)

        with progress.bar(n, "fast") as bar, ThreadPoolExecutor(self.workers) as pool:
            choice = np.concatenate(list(pool.map(solve_chunk, range(len(chunks)))))
            bar.update(n)
        if replicas == 1:
            return choice
        best = _Terms(gram, rough_gram, step, frac, free, cross).energies(choice).reshape(n, replicas).argmin(axis=1)
        return choice.reshape(n, replicas, f)[np.arange(n), best]

    def split(self, n: int, f: int, parts: int) -> list[tuple[slice, int]]:
        """Up to ``parts`` runs of whole chunks covering a layer's n neurons, as (neuron rows,
        first chunk) for ``solve_part``; one run when the layer is searched in replicas."""
        plan = self.plan(n, f)
        if plan.replicas > 1:
            return [(slice(0, n), 0)]
        bounds = np.linspace(0, len(plan.chunks), min(parts, len(plan.chunks)) + 1).round().astype(int)
        return [(slice(plan.chunks[a].start, plan.chunks[b - 1].stop), int(a)) for a, b in pairwise(bounds)]


@dataclass(frozen=True)
class FastPlan:
    """A layer's search: neurons searched ``replicas`` times each, tabu rounds of ``tabu_steps``
    (none under MIN_TABU_STEPS), and chunks of replicated rows; chunk k draws its random
    numbers from ``default_rng([seed, k])``."""

    replicas: int
    tabu_steps: int
    chunks: tuple[slice, ...]


def start_factor(problem: LayerProblem) -> np.ndarray:
    """The sequential start's ``feedback_factor``, on the Gram of the weights (each weight's D
    variables see the same input: one row and column of G per weight)."""
    d = len(problem.rounding.digits)
    return feedback_factor(problem.gram[::d, ::d] if d > 1 else problem.gram)


def feedback_factor(gram: np.ndarray) -> np.ndarray:
    """Upper triangular U with ``U^T U = H^-1``, H the damped Gram (GPTQ's ``Hinv``).

    1% of the mean diagonal is added so that dead inputs (always zero) do not make G singular.
    With J the order reversal, ``U = J L^-1 J`` for the Cholesky factor L of ``J H J``: one
    factorization and one triangular inverse.
    """
    f = len(gram)
    damp = 0.01 * np.mean(np.diag(gram))
    h = gram + (damp if damp > 0 else 1.0) * np.eye(f)
    lower = np.linalg.cholesky(h[::-1, ::-1])
    return lower_inverse(lower)[::-1, ::-1].copy()


def lower_inverse(lower: np.ndarray, leaf: int = 1024) -> np.ndarray:
    """Inverse of a lower triangular matrix: LAPACK's general inverse up to ``leaf`` rows, above
    by halves, ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``: about f^3 / 3
    multiply-adds in matrix products instead of the general inverse's 2 f^3."""
    f = len(lower)
    if f <= leaf:
        return np.linalg.inv(lower)
    h = f // 2
    top, bottom = lower_inverse(lower[:h, :h], leaf), lower_inverse(lower[h:, h:], leaf)
    out = np.zeros_like(lower)
    out[:h, :h], out[h:, h:] = top, bottom
    out[h:, :h] = -(bottom @ (lower[h:, :h] @ top))
    return out


@dataclass(frozen=True, eq=False)
class _Terms:
    """The problem data of a chunk of neurons (rows of LayerProblem, step expanded to [n, m]);
    ``rough_gram`` is G in float32, for the descent's first stage."""

    gram: np.ndarray
    rough_gram: np.ndarray
    step: np.ndarray
    frac: np.ndarray
    free: np.ndarray
    cross: np.ndarray

    def rows(self, rows) -> _Terms:
        return _Terms(self.gram, self.rough_gram, self.step[rows], self.frac[rows], self.free[rows], self.cross[rows])

    def energies(self, v: np.ndarray) -> np.ndarray:
        """E_i for every neuron (without the constant offset)."""
        e = self.step * (self.frac - v)
        return np.einsum("if,if->i", e @ self.gram + 2.0 * self.cross, e)

    def per_weight(self, d: int) -> _Terms:
        """For weights of ``d`` one-step variables each (``levels`` d + 1, grid.level_digits):
        one variable per weight on the weights' Gram, its frac the offset above its window's
        base (0 .. d inside the window)."""
        n = len(self.frac)
        return _Terms(self.gram[::d, ::d], self.rough_gram[::d, ::d], self.step[:, ::d],
                      self.frac.reshape(n, -1, d).sum(axis=2), np.asarray(self.free.reshape(n, -1, d).all(axis=2)),
                      self.cross[:, ::d])

    def floor_or_ceiling(self, d: int) -> tuple[_Terms, np.ndarray]:
        """The problem restricted to each weight's floor or ceiling (``per_weight``, frac above
        the floor), and the floor's offset in its window [n, weights]."""
        weights = self.per_weight(d)
        floor = np.clip(np.floor(weights.frac), 0, d - 1)
        return replace(weights, frac=weights.frac - floor), floor.astype(np.int64)


def unary(offsets: np.ndarray, d: int) -> np.ndarray:
    """Offsets [n, weights] in 0..d as ``d`` one-step variables per weight (the first ones set)."""
    return (offsets[:, :, None] > np.arange(d)).reshape(len(offsets), -1)


def sequential_start(terms: _Terms, upper: np.ndarray, digits: tuple[int, ...] = (1,), block: int = 128,
                     inner: int = 16) -> np.ndarray:
    """Round weights in input order, each to the nearest of its levels (floor or ceiling with
    two), feeding its error forward (GPTQ's lazy-batch update restricted to the weight's
    levels), in output units, in the precision of ``upper`` (``start_factor``). With more than
    two levels (``digits``: one-step variables, grid.level_digits) each weight's variables are
    rounded as one, and the chosen offset written back as that many set variables."""
    d = len(digits)
    if d == 1:
        return _sequential_offsets(terms, upper, 1, block, inner).astype(bool)
    return unary(_sequential_offsets(terms.per_weight(d), upper, d, block, inner), d)


def _sequential_offsets(terms: _Terms, upper: np.ndarray, top: int, block: int, inner: int) -> np.ndarray:
    """``sequential_start``'s rounding of one variable per weight to an offset in 0 .. ``top``
    grid steps above its base. The target is the unconstrained optimum ``e = -c H^-1``, i.e.
    ``p v = p u + c H^-1``.

    Two levels of lazy batches: the error of a variable reaches the rest of its ``inner`` run
    at once, that run's errors the rest of its ``block`` in one product, the block's the
    remaining inputs in one more. A block is worked on transposed (a variable's values over
    the neurons are then contiguous)."""
    target = (terms.step * terms.frac).astype(upper.dtype)
    if terms.cross.any():
        target += (terms.cross.astype(upper.dtype) @ upper.T) @ upper
    n, f = target.shape
    v = np.zeros((n, f), dtype=np.int8)
    for b0 in range(0, f, block):
        b1 = min(b0 + block, f)
        local, step, free = (a[:, b0:b1].T.astype(dtype, order="C") for a, dtype in
                             ((target, upper.dtype), (terms.step, upper.dtype), (terms.free, bool)))
        chosen, errors = np.zeros(local.shape, dtype=upper.dtype), np.empty_like(local)
        diagonal = upper[b0:b1, b0:b1]
        for i0 in range(0, b1 - b0, inner):
            i1 = min(i0 + inner, b1 - b0)
            for j in range(i0, i1):
                chosen[j] = free[j] * np.clip(np.floor(local[j] / step[j] + 0.5), 0, top)
                errors[j] = (local[j] - step[j] * chosen[j]) / diagonal[j, j]
                local[j + 1:i1] -= np.outer(diagonal[j, j + 1:i1], errors[j])
            local[i1:] -= np.einsum("ir,in->rn", diagonal[i0:i1, i1:], errors[i0:i1])  # no BLAS call
        v[:, b0:b1] = chosen.T
        target[:, b1:] -= errors.T @ upper[b0:b1, b1:]
    return v


def best_start(terms: _Terms, sequential: np.ndarray) -> tuple[_State, np.ndarray, np.ndarray]:
    """Per neuron, the better of the ``sequential`` start and round-to-nearest, as a search
    state (which reuses the two ``e G`` products of the comparison); and round-to-nearest's
    choice with its exact energies. The sequential start is compared in float32."""
    nearest = terms.free & (terms.frac >= 0.5)
    rough_error = (terms.step * (terms.frac - sequential)).astype(np.float32)
    rough_product = rough_error @ terms.rough_gram
    rough_energy = np.einsum("if,if->i", rough_product + 2.0 * terms.cross.astype(np.float32), rough_error)
    error = terms.step * (terms.frac - nearest)
    product = error @ terms.gram
    nearest_energy = np.einsum("if,if->i", product + 2.0 * terms.cross, error)
    better = (rough_energy < nearest_energy)[:, None]
    return (_State(terms, np.where(better, sequential, nearest), np.where(better, rough_product, product)),
            nearest, nearest_energy)


class _State:
    """Current choice of a chunk of neurons (``choice``, with ``signed_step = d p``, where
    ``d = 1 - 2 v`` is the direction of each variable's next flip), half the energy change of
    each flip (``half``) and the energies.

    With ``r = G e + c``, flipping v_j changes E by ``2 h_j``, ``h_j = p_j^2 G_jj / 2 - d_j p_j r_j``
    (+inf where the variable is fixed). Flipping v_c moves r by ``-d_c p_c G[:, c]``, so every
    other h_j by ``d_j p_j d_c p_c G_jc``, and turns h_c into ``-h_c``: moves update the gains
    themselves, which saves recomputing them from r before every move."""

    ARRAYS = ("step", "free", "choice", "signed_step", "half", "energy", "scale")
    MOVED = ("choice", "signed_step", "half", "energy", "scale")  # what moves read
    WRITTEN = ("choice", "signed_step", "half", "energy")  # and what they change

    def __init__(self, terms: _Terms, v: np.ndarray, product: np.ndarray | None = None):
        self.terms = terms
        self.gram, self.step, self.free = terms.gram, terms.step, terms.free
        self.reset(v, product)
        flip_cost = np.max(self.step ** 2 * np.diag(self.gram), axis=1, initial=0.0)
        self.scale = (np.abs(self.energy) + flip_cost) * TOLERANCE + 1e-300

    @property
    def v(self) -> np.ndarray:
        return self.choice.copy()

    def reset(self, v: np.ndarray, product: np.ndarray | None = None) -> None:
        """Move to choice v (``product``: its ``e G`` when already computed)."""
        step = self.step
        self.choice = v.copy()
        self.signed_step = np.where(v, -step, step)
        e = step * (self.terms.frac - v)
        r = (e @ self.gram if product is None else product) + self.terms.cross
        self.energy = np.einsum("if,if->i", r + self.terms.cross, e)
        r *= self.signed_step
        half_cost = np.where(self.free, 0.5 * step ** 2 * np.diag(self.gram), np.inf)
        self.half = np.subtract(half_cost, r, out=half_cost)

    def block(self, rows: slice) -> _State:
        """The state of a contiguous run of neurons, as views: moves on it update this state."""
        part = object.__new__(_State)
        part.terms, part.gram = self.terms.rows(rows), self.gram
        for name in self.ARRAYS:
            setattr(part, name, getattr(self, name)[rows])
        return part

    def gains(self) -> np.ndarray:
        """Energy change of flipping each variable of each neuron (+inf where not free)."""
        return 2.0 * self.half

    def gain_of(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Energy change of flipping variable cols[k] of neuron rows[k]."""
        return 2.0 * self.half[rows, cols]

    def flip(self, rows: np.ndarray, cols: np.ndarray, gain: np.ndarray) -> None:
        """Flip variable cols[k] of neuron rows[k], whose energy change is gain[k]."""
        d_step = self.signed_step[rows, cols]
        update = self.gram[cols]
        update *= d_step[:, None]
        if len(rows) == len(self.half):  # every neuron moves (rows is then 0..n-1): no gathers
            update *= self.signed_step
            self.half += update
        else:
            update *= self.signed_step[rows]
            self.half[rows] += update
        self.half[rows, cols] = -0.5 * gain
        self.choice[rows, cols] ^= True
        self.signed_step[rows, cols] = -d_step
        self.energy[rows] += gain

    def rough(self) -> _State:
        """A float32 copy of this state (energies stay float64), with float32's tolerance."""
        part = object.__new__(_State)
        part.terms, part.gram = self.terms, self.terms.rough_gram
        part.step, part.free, part.choice, part.energy = self.step, self.free, self.choice.copy(), self.energy.copy()
        part.signed_step, part.half = self.signed_step.astype(np.float32), self.half.astype(np.float32)
        part.scale = np.maximum(self.scale * (ROUGH_TOLERANCE / TOLERANCE), ROUGH_FLOOR)
        return part

    def descend(self, pair_candidates: int) -> None:
        """Best single flip per neuron until none improves, then its best pair; until stuck.

        First in float32 (``descend_rough``), then from the exact residual in float64
        (``descend_exact``): the result is a float64 local minimum, as good as the float64
        descent alone, in about half the time (the float32 stage's moves are improvements up
        to float32's precision; the float64 stage's exactly)."""
        self.descend_rough(pair_candidates)
        self.reset(self.choice)
        self.descend_exact(pair_candidates)

    def descend_rough(self, pair_candidates: int) -> None:
        """The float32 descent: moves the choice only (``reset`` then makes the state exact).

        Neurons descend independently, so they go in blocks of about ``DESCENT_ELEMENTS``
        variables: a step's arrays then stay in the core's cache (several times faster per
        element than streaming a whole chunk from memory), and a block stops with its last
        neuron. The moves, and so the result, are those of the whole chunk at once."""
        for rows in self.blocks():
            part = self.block(rows)
            rough = part.rough()
            rough._descend_block(pair_candidates, ROUGH_STEPS * part.half.shape[1])
            moved = rough.choice != part.choice
            part.choice[moved] ^= True
            part.signed_step[moved] *= -1.0

    def descend_exact(self, pair_candidates: int) -> None:
        """The float64 descent, in the same blocks."""
        for rows in self.blocks():
            self.block(rows)._descend_block(pair_candidates)

    def blocks(self) -> list[slice]:
        size = max(1, DESCENT_ELEMENTS // max(self.half.shape[1], 1))
        return [slice(start, start + size) for start in range(0, len(self.half), size)]

    def _descend_block(self, pair_candidates: int, max_steps: int | None = None) -> None:
        """Descend every neuron of this state until stuck (or for ``max_steps`` steps: the
        float32 stage's gains drift with its rounding, so that near ties could cycle there). A
        neuron that stops leaves the working arrays (a compacted copy, its final state written
        back here), so that the moves of the others stay whole-array operations, without
        gathers and scatters."""
        work, ids = self, np.arange(len(self.half))
        steps = 0
        while len(ids) and (max_steps is None or steps < max_steps):
            steps += 1
            half = work.half
            rows = np.arange(len(ids))
            cols = np.argmin(half, axis=1)
            best = 2.0 * half[rows, cols]
            improving = best < -work.scale
            if improving.all():
                work.flip(rows, cols, best)
                continue
            work.flip(rows[improving], cols[improving], best[improving])
            stuck = rows[~improving]
            moved = work._pair_step(stuck, 2.0 * half[~improving], pair_candidates)
            done = stuck[~moved]
            if len(done):
                self._write_back(work, ids, done)
                keep = np.ones(len(ids), dtype=bool)
                keep[done] = False
                work, ids = work.moving(keep), ids[keep]
        self._write_back(work, ids, np.arange(len(ids)))  # those still moving at max_steps

    def _write_back(self, work: _State, ids: np.ndarray, rows: np.ndarray) -> None:
        """Copy rows ``rows`` of ``work`` (a compacted copy holding this state's rows ``ids``) here."""
        if work is not self and len(rows):
            for name in self.WRITTEN:
                getattr(self, name)[ids[rows]] = getattr(work, name)[rows]

    def moving(self, keep: np.ndarray) -> _State:
        """A copy of the arrays that moves use, for the neurons ``keep`` (bool)."""
        part = object.__new__(_State)
        part.gram = self.gram
        for name in self.MOVED:
            setattr(part, name, getattr(self, name)[keep])
        return part

    def _pair_step(self, rows, gain, k) -> np.ndarray:
        """Apply each neuron's best improving pair among its k best single flips (each pair
        once: reading G's entries at random is most of a step's cost)."""
        k = min(k, gain.shape[1])
        if k < 2:
            return np.zeros(len(rows), dtype=bool)
        cand = np.argpartition(gain, k - 1, axis=1)[:, :k]
        at = np.arange(len(rows))
        g, d = gain[at[:, None], cand], self.signed_step[rows[:, None], cand]
        first, second = np.triu_indices(k, 1)
        pair = g[:, first] + g[:, second] + 2.0 * d[:, first] * d[:, second] * \
            self.gram[cand[:, first], cand[:, second]]
        best = pair.argmin(axis=1)
        total = pair[at, best]
        moved = np.isfinite(total) & (total < -self.scale[rows])
        a, b = first[best][moved], second[best][moved]
        sel, kept = rows[moved], at[moved]
        self.flip(sel, cand[kept, a], g[kept, a])
        # the second flip's gain changed with the first: recompute it on the updated state
        jb = cand[kept, b]
        self.flip(sel, jb, self.gain_of(sel, jb))
        return moved


def tabu_search(state: _State, steps_per_round: int, rounds: int, rng: np.random.Generator,
                patience: int = 2) -> np.ndarray:
    """Batched iterated tabu search from the state's choice; returns each neuron's best choice.

    Every step, each neuron flips its best variable that is not tabu (or that would beat its
    best so far), uphill if need be. A flipped variable stays tabu for a random 1..k steps
    (k = its free variables, at most 20): long random tenures push the search out of the
    few cheap flips it would otherwise cycle through. After a round that did not improve its
    best, a neuron restarts from its best with a random fifth of its free variables flipped
    (about ``KICK_FLIPS`` at most: on wide neurons a larger kick only undoes the descent);
    after ``patience`` such rounds in a row it stops.
    """
    n, f = state.half.shape
    free_count = state.free.sum(axis=1)
    max_tenure = np.clip(free_count, 1, 20)
    tabu_until = np.zeros((n, f), dtype=np.int64)
    current, best_v, best_energy = state.v, state.v, state.energy.copy()
    idle_rounds = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    step = 0
    for _ in range(rounds):
        sub = _State(state.terms.rows(active), current[active])
        sub_best, sub_tabu = best_energy[active], tabu_until[active]
        improved = np.zeros(len(active), dtype=bool)
        rows = np.arange(len(active))
        for _ in range(steps_per_round):
            step += 1
            gain = sub.gains()
            aspiration = gain < (sub_best - sub.scale - sub.energy)[:, None]
            gain[(sub_tabu >= step) & ~aspiration] = np.inf
            cols = np.argmin(gain, axis=1)
            chosen = gain[rows, cols]
            movable = np.isfinite(chosen)
            sub.flip(rows[movable], cols[movable], chosen[movable])
            tenure = 1 + (rng.random(len(rows)) * max_tenure[active]).astype(np.int64)
            sub_tabu[rows[movable], cols[movable]] = step + tenure[movable]
            better = sub.energy < sub_best - sub.scale
            if better.any():
                improved |= better
                sub_best[better] = sub.energy[better]
                best_v[active[better]] = sub.choice[better]
        best_energy[active], tabu_until[active] = sub_best, sub_tabu
        current[active] = sub.choice
        idle_rounds[active] = np.where(improved, 0, idle_rounds[active] + 1)
        stalled = active[~improved]
        kick_rate = np.minimum(0.2, KICK_FLIPS / np.maximum(free_count[stalled], 1))[:, None]
        kicks = state.free[stalled] & (rng.random((len(stalled), f)) < kick_rate)
        current[stalled] = best_v[stalled] ^ kicks
        tabu_until[stalled] = 0
        active = active[idle_rounds[active] < patience]
        if not len(active):
            break
    return best_v
