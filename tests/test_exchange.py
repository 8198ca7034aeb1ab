"""--dump-qubo / --load-solution: another solver can take the problems and give roundings back."""

import json

import numpy as np
import onnx
import pytest
import runs
from click.testing import CliRunner
from onnx import numpy_helper

from onnx_qubo.cli import main
from onnx_qubo.core.progress import Progress
from onnx_qubo.rounding.exchange import file_stems, read_problem
from onnx_qubo.rounding.solvers import ExactSolver

from graphs import mlp_model

X = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)


def test_file_stems_are_safe_and_unique():
    assert file_stems(["/fc1/Gemm", "fc1:Gemm", "a", ""]) == ["fc1_Gemm", "fc1_Gemm_1", "a", "layer"]


def test_dumped_problems_reproduce_the_reported_costs(tmp_path):
    model = mlp_model()
    for node in model.graph.node:
        node.name = "/" + node.name + "/Gemm"  # PyTorch-style names
    # damping 0: a dump holds the objective solved, which a ridge (--damping, auto at 2 bits) moves off
    # the output error the report states
    report = runs.quantize(model, tmp_path / "q.onnx", calibration={"x": X}, solver="rtn",
                           dump_qubo=tmp_path / "dump", bias_correction=False, damping=0)
    index = json.loads((tmp_path / "dump" / "index.json").read_text())
    assert [e["layer"] for e in index] == ["/fc0/Gemm", "/fc1/Gemm"]
    for entry, layer in zip(index, report.layers):
        problem = read_problem(tmp_path / "dump" / entry["file"])
        assert problem.shape == (entry["n_out"], entry["f_in"])
        rtn = problem.rounding.free & (problem.rounding.frac >= 0.5)
        assert problem.energy(rtn) == pytest.approx(layer.cost_rtn, rel=1e-9)
        qubo = problem.neuron_qubo(0)
        assert qubo.quadratic.shape == (len(qubo.variables),) * 2


@pytest.mark.slow
def test_loaded_solutions_are_used_as_given(tmp_path):
    # damping 0 (auto at 2 bits): the report's cost is then the dumped energy (see the test above)
    runs.quantize(mlp_model(), tmp_path / "q.onnx", calibration={"x": X}, dump_qubo=tmp_path / "d", damping=0)
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    expected = {}
    for entry in index:  # an "external" solver: the exact one, on the dumped files only
        problem = read_problem(tmp_path / "d" / entry["file"])
        choice = ExactSolver().solve(problem, 0, Progress())
        np.save(tmp_path / "d" / entry["file"].replace(".qubo.npz", ".solution.npy"), choice.astype(np.uint8))
        expected[entry["layer"]] = (problem.energy(choice), problem.integers(choice))

    report = runs.quantize(mlp_model(), tmp_path / "q2.onnx", calibration={"x": X},
                                load_solution=tmp_path / "d", damping=0)
    assert report.solver == "loaded"
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q2.onnx").graph.initializer}
    for layer, weight in zip(report.layers, ("W0", "W1")):
        cost, integers = expected[layer.name]
        assert layer.final_cost == pytest.approx(cost, rel=1e-12)
        np.testing.assert_array_equal(inits[f"{weight}_quantized"], integers)


def test_bad_solutions_are_refused(tmp_path):
    model_path = tmp_path / "m.onnx"
    onnx.save(mlp_model(), model_path)
    np.savez(tmp_path / "m.calib.npz", x=X)
    dump = tmp_path / "d"

    def run(*args):
        return CliRunner().invoke(main, [str(model_path), str(tmp_path / "o.onnx"), *map(str, args)])

    assert run("--dump-qubo", dump, "--quiet").exit_code == 0
    (tmp_path / "o.onnx").unlink()

    result = run("--load-solution", dump)
    assert result.exit_code == 1 and "no solution file" in result.output

    np.save(dump / "fc0.solution.npy", np.zeros((3, 3)))
    np.save(dump / "fc1.solution.npy", np.zeros((4, 6)))
    result = run("--load-solution", dump)
    assert result.exit_code == 1 and "must be a (6, 8) array of 0/1" in result.output

    np.save(dump / "fc0.solution.npy", np.zeros((6, 8)))
    result = run("--load-solution", dump, "--bits", "4")
    assert result.exit_code == 1 and "dumped with other scales" in result.output
    assert not (tmp_path / "o.onnx").exists()
    assert run("--load-solution", dump, "--quiet").exit_code == 0


@pytest.mark.slow
def test_dumped_problems_carry_bias_variables_and_input_quantization(tmp_path):
    report = runs.quantize(mlp_model(), tmp_path / "q.onnx", calibration={"x": X}, bias="quantize",
                                activations="uint8", granularity="block", block_size=4, dump_qubo=tmp_path / "dump",
                                damping=0)  # the dumped energy is the reported cost (see above)
    index = json.loads((tmp_path / "dump" / "index.json").read_text())
    for entry, layer in zip(index, report.layers):
        assert entry["variables"] == entry["f_in"] + 1  # the bias is the last variable
        problem = read_problem(tmp_path / "dump" / entry["file"])
        assert problem.shape == (entry["n_out"], entry["variables"])
        assert np.abs(problem.cross).max() > 0 and (problem.offset > 0).all()
        rtn = problem.rounding.free & (problem.rounding.frac >= 0.5)
        assert problem.energy(rtn) == pytest.approx(layer.cost_rtn, rel=1e-9)
