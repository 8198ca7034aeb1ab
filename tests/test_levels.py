"""More than two levels per weight (``--levels``): the encoding is exact (every code of the
window reachable, nothing outside it, energy = measured error), round-to-nearest is still each
variable's own nearest value, the solvers find what brute force finds, and the engine never
does worse than the floor-or-ceiling choice it starts from."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from runs import quantize
from test_schemes import measured_error

from onnx_qubo.config import QuantizeConfig
from onnx_qubo.core.errors import OptionError
from onnx_qubo.core.grid import IntegerGrid, level_digits, split_levels
from onnx_qubo.rounding.exchange import read_problem, write_problem
from onnx_qubo.rounding.qubo import build_problem
from onnx_qubo.rounding.solvers import FastSolver, RoundToNearest
from onnx_qubo.rounding.solvers.exact import ExactSolver
from onnx_qubo.rounding.workers import solve_many, split_layer

from graphs import gemm_model, mlp_model


def correlated_layer(n: int, f: int, bits: int, levels: int, seed: int = 0, ratio: float = 0.9,
                     symmetric: bool = True):
    """A layer on strongly correlated inputs (where rounding choices interact), its inputs and
    scales; asymmetric grids get per-row zero points."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((40 * f, f))
    x = z @ (np.eye(f) + 0.9 * rng.standard_normal((f, f)) / np.sqrt(f)) + 0.5 * rng.standard_normal((len(z), 1))
    w = rng.standard_normal((n, f))
    grid = IntegerGrid(bits, symmetric)
    if symmetric:
        scale, zero_point = np.abs(w).max(axis=1, keepdims=True) / grid.qmax * ratio, 0
    else:
        low, high = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
        scale = (high - low) / grid.qmax * ratio
        zero_point = np.round(-low / scale)
    problem = build_problem(w, scale, zero_point, 1.0, grid, x.T @ x / len(x), levels=levels)
    return problem, w, x, scale, zero_point, grid


def test_level_digits_reach_every_offset_of_the_window_and_nothing_else():
    for levels in (2, 3, 4):
        digits = level_digits(levels)
        sums = {sum(d * b for d, b in zip(digits, bits)) for bits in itertools.product((0, 1), repeat=len(digits))}
        assert sums == set(range(levels))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits,levels", [(2, 3), (2, 4), (3, 3), (3, 4), (4, 4)])
def test_rtn_on_the_variables_is_round_to_nearest_on_the_grid(bits, levels, symmetric):
    grid = IntegerGrid(bits, symmetric)
    scaled = np.random.default_rng(bits).uniform(grid.qmin - 2, grid.qmax + 2, (6, 40))  # some clamped
    rounding = split_levels(scaled, grid, levels)
    assert rounding.free.all() and rounding.frac.shape == (6, 40 * (levels - 1))
    choice = rounding.free & (rounding.frac >= 0.5)
    np.testing.assert_array_equal(rounding.integers(choice), grid.round_nearest(scaled))
    for _ in range(5):  # any choice stays on the grid and within levels - 1 steps of the window's base
        codes = rounding.integers(np.random.default_rng(_).random(rounding.frac.shape) < 0.5)
        assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
        assert (np.abs(codes - scaled) <= levels + 1).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("levels", [3, 4])
def test_energy_is_the_output_error_of_the_decoded_codes(levels, symmetric):
    problem, w, x, scale, zero_point, _ = correlated_layer(5, 9, 3, levels, symmetric=symmetric)
    rng = np.random.default_rng(1)
    for _ in range(4):
        choice = rng.random(problem.shape) < 0.5
        dequantized = scale * (problem.integers(choice) - zero_point)
        measured = (((w - dequantized) @ x.T) ** 2).mean(axis=1)
        np.testing.assert_allclose(problem.neuron_energies(choice), measured, rtol=1e-9)
        np.testing.assert_allclose(problem.errors(choice), w - dequantized)


@pytest.mark.parametrize("bits,levels", [(2, 3), (2, 4), (3, 4)])
def test_exact_solver_finds_the_best_codes_of_the_window(bits, levels):
    problem, w, x, scale, _, grid = correlated_layer(3, 5, bits, levels, seed=bits + levels, ratio=0.8)
    solved = problem.neuron_energies(ExactSolver().solve(problem))
    base = problem.rounding.base[:, levels - 2::levels - 1]  # each weight's window starts here
    for i in range(problem.shape[0]):
        windows = [range(b, b + levels) for b in base[i]]
        best = min(float((((w[i] - scale[i] * np.array(codes)) @ x.T) ** 2).mean())
                   for codes in itertools.product(*windows))
        assert solved[i] == pytest.approx(best, rel=1e-9)


def test_more_levels_never_cost_more_when_solved_exactly():
    """The windows nest (2 levels in 3 in 4), so the optima can only improve; on correlated
    inputs they do."""
    costs = [correlated_layer(4, 6, 3, levels, seed=5)[0] for levels in (2, 3, 4)]
    optima = [p.energy(ExactSolver().solve(p)) for p in costs]
    assert optima[2] <= optima[1] * (1 + 1e-12) and optima[1] <= optima[0] * (1 + 1e-12)
    assert optima[2] < 0.97 * optima[0]


@pytest.mark.parametrize("levels", [3, 4])
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.slow
def test_fast_solver_with_levels_beats_the_binary_choice(bits, levels):
    two = correlated_layer(64, 96, bits, 2, seed=bits)[0]
    more = correlated_layer(64, 96, bits, levels, seed=bits)[0]
    rtn = more.energy(RoundToNearest().solve(more))
    assert rtn == pytest.approx(two.energy(RoundToNearest().solve(two)))
    binary, multi = two.energy(FastSolver().solve(two)), more.energy(FastSolver().solve(more))
    assert multi < binary < rtn


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.slow
def test_fast_split_with_levels_equals_whole(parts):
    problem = correlated_layer(128, 80, 2, 4)[0]
    settings = {"chunk_bytes": 32 * 160 * 160}
    whole = FastSolver(**settings).solve(problem, seed=3)
    assert np.array_equal(np.concatenate(solve_many(split_layer(problem, "fast", 3, parts, settings))), whole)


def test_dumped_problem_keeps_its_digits(tmp_path):
    problem = correlated_layer(3, 4, 2, 4)[0]
    write_problem(tmp_path, "layer", problem)
    read = read_problem(tmp_path / "layer.qubo.npz")
    assert read.rounding.digits == problem.rounding.digits
    choice = np.random.default_rng(0).random(problem.shape) < 0.5
    np.testing.assert_array_equal(read.integers(choice), problem.integers(choice))
    assert read.energy(choice) == pytest.approx(problem.energy(choice))
    assert read.neuron_qubo(1).energy(choice[1]) == pytest.approx(problem.neuron_energies(choice)[1])


def test_levels_are_checked_against_the_grid():
    with pytest.raises(OptionError, match="levels"):
        QuantizeConfig.from_flat(levels=5)
    with pytest.raises(OptionError, match="1-bit grid has 2 levels"):
        QuantizeConfig.from_flat(bits=1, levels=3)
    config = QuantizeConfig.from_flat(bits=2, levels=4)
    assert QuantizeConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("scheme", [dict(), dict(symmetric=False, granularity="block", block_size=4),
                                    dict(bias="quantize")])
@pytest.mark.parametrize("levels", [3, 4])
@pytest.mark.parametrize("damping", [0, "auto"])
@pytest.mark.slow
def test_reported_cost_with_levels_is_the_measured_output_error(damping, levels, scheme, tmp_path):
    """Also with a ridge, whose objective (over each weight's variables) is not the error reported."""
    model = gemm_model(f=12, n=7, trans_b=0, alpha=-0.7, beta=0.5, relu=False)
    x = (np.random.default_rng(0).standard_normal((300, 12)) + 0.3).astype(np.float32)
    out = tmp_path / "q.onnx"
    report = quantize(model, out, bits=2, levels=levels, calibration={"x": x}, damping=damping, **scheme)
    assert report.evaluation.default_matches_basic
    cost = sum(layer.final_cost for layer in report.layers)
    assert cost == pytest.approx(measured_error(model, out, x), rel=1e-3)
    if damping == 0:  # below round to nearest on the objective, which is then the error
        assert cost <= sum(layer.cost_rtn for layer in report.layers) * (1 + 1e-9)


@pytest.mark.slow
def test_levels_lower_the_cost_of_a_two_bit_mlp(tmp_path):
    model = mlp_model(widths=(24, 32, 8))
    x = np.random.default_rng(0).standard_normal((256, 24)).astype(np.float32)
    costs = {levels: sum(layer.cost_solved for layer in quantize(  # damping 0: the costs are the objective's
        model, tmp_path / f"q{levels}.onnx", bits=2, head_bits=2, levels=levels, calibration={"x": x},
        damping=0).layers) for levels in (2, 4)}
    assert costs[4] < costs[2]
    onnx.checker.check_model(onnx.load(tmp_path / "q4.onnx"), full_check=True)
