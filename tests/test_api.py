"""End to end through ``onnx_qubo.quantize``: the written model runs in onnxruntime and
computes exactly what numpy computes with the dequantized weights read back from it."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import runs
from onnx import TensorProto, helper, numpy_helper

import onnx_qubo

from graphs import gemm_model, matmul_model, mlp_model


def dequantized_weights(path):
    """{original weight name: dequantized [n, f]} read from the written file with onnx only."""
    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    weights = {}
    for name, values in inits.items():
        if name.endswith("_quantized"):
            base = name[:-len("_quantized")]
            zero_point = inits.get(base + "_zero_point", np.zeros(1)).astype(np.float64)
            weights[base] = (values.astype(np.float64) - zero_point.reshape(-1, 1)) * inits[base + "_scale"][:, None]
    return model, weights


def ort_run(model, feed):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_mlp_round_trip_matches_numpy_with_dequantized_weights(tmp_path, bits):
    model = mlp_model(widths=(8, 6, 4))
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    report = runs.quantize(model, tmp_path / "q.onnx", bits=bits, calibration={"x": x}, solver="neal",
                           symmetric=True, bias_correction=False)

    written, weights = dequantized_weights(tmp_path / "q.onnx")
    inits = {i.name: numpy_helper.to_array(i) for i in written.graph.initializer}
    widths = {"W0": bits, "W1": max(bits, 4)}  # fc1 gives the output: 4 bits below 4 (--head-bits' default)
    stored = {i.name: i.data_type for i in written.graph.initializer if i.name.endswith("_quantized")}
    assert stored == {f"{name}_quantized": TensorProto.INT2 if width <= 2 else TensorProto.INT4 if width <= 4
                      else TensorProto.INT8 for name, width in widths.items()}
    assert "W0" not in inits and "W1" not in inits
    for name in weights:
        q = inits[name + "_quantized"]
        assert q.min() >= -(2 ** (widths[name] - 1)) and q.max() <= 2 ** (widths[name] - 1) - 1
    assert [layer.bits for layer in report.layers] == [bits, max(bits, 4)]

    hidden = np.maximum(x @ weights["W0"].T + inits["b0"], 0)
    np.testing.assert_allclose(ort_run(written, {"x": x}), hidden @ weights["W1"].T + inits["b1"], rtol=1e-4, atol=1e-4)
    assert [layer.name for layer in report.layers] == ["fc0", "fc1"]
    assert all(layer.cost_solved <= layer.cost_rtn * (1 + 1e-9) for layer in report.layers)
    assert report.evaluation.default_matches_basic
    assert report.evaluation.default_vs_unoptimized < 1e-6 and report.evaluation.basic_vs_unoptimized < 1e-6
    assert report.speed is not None and report.speed.quantized_single > 0 and report.speed.batch_size == 64


@pytest.mark.parametrize("make", [lambda: gemm_model(trans_b=0, alpha=0.5),
                                  lambda: matmul_model(bias=True),
                                  lambda: matmul_model(bias=False, leading=(3,))])
@pytest.mark.slow
def test_other_forms_round_trip(tmp_path, make):
    model = make()
    x_shape = [d.dim_value or 20 for d in model.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    report = runs.quantize(model, tmp_path / "q.onnx", bits=2, calibration={"x": x}, solver="exact",
                           bias_correction=False)
    written, weights = dequantized_weights(tmp_path / "q.onnx")
    # the float model with the dequantized weights swapped in, in the node's own layout
    trans_b = next((a.i for a in model.graph.node[0].attribute if a.name == "transB"), 0)
    stored = weights["W"] if trans_b else weights["W"].T
    reference = onnx.ModelProto()
    reference.CopyFrom(model)
    next(i for i in reference.graph.initializer if i.name == "W").CopyFrom(
        numpy_helper.from_array(stored.astype(np.float32), "W"))
    np.testing.assert_allclose(ort_run(written, {"x": x}), ort_run(reference, {"x": x}), rtol=1e-5, atol=1e-5)
    assert report.layers[0].cost_solved <= report.layers[0].cost_rtn * (1 + 1e-9)


def test_calibration_data_reader_is_accepted(tmp_path):
    model = mlp_model()
    batches = [{"x": np.random.default_rng(i).standard_normal((8, 8)).astype(np.float32)} for i in range(4)]

    class Reader:  # onnxruntime.quantization.CalibrationDataReader's interface
        def __init__(self):
            self.items = iter(batches)

        def get_next(self):
            return next(self.items, None)

    report = runs.quantize(model, tmp_path / "q.onnx", calibration=Reader(), solver="rtn")
    assert report.calibration_samples == 32 and report.evaluation.samples == 32


def test_report_json_and_labels(tmp_path):
    model = mlp_model()
    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    labels = ort_run(model, {"x": x}).argmax(axis=1)
    report = runs.quantize(model, tmp_path / "q.onnx", calibration={"x": x},
                                evaluation={"x": x, "labels": labels}, solver="rtn",
                                report_path=tmp_path / "r.json")
    assert report.evaluation.float_accuracy == 1.0
    assert report.evaluation.quantized_accuracy == report.evaluation.top1_agreement
    assert '"cost_rtn"' in (tmp_path / "r.json").read_text()


@pytest.mark.parametrize("make,x_shape", [
    (lambda: gemm_model(trans_b=0, alpha=0.7, beta=0.5, bias=True), (200, 6)),
    (lambda: matmul_model(bias=True), (200, 6)),
    (lambda: matmul_model(bias=False, leading=(3,)), (70, 3, 6)),
])
def test_bias_correction_cancels_the_mean_output_error(tmp_path, make, x_shape):
    model = make()
    if model.graph.node[-1].op_type == "Relu":  # compare pre-activations: drop the Relu
        model.graph.node[0].output[0] = "y"
        del model.graph.node[-1]
    x = (np.random.default_rng(3).standard_normal(x_shape) + 1.0).astype(np.float32)
    runs.quantize(model, tmp_path / "plain.onnx", calibration={"x": x}, solver="rtn", bias_correction=False)
    corrected = runs.quantize(model, tmp_path / "c.onnx", calibration={"x": x}, solver="rtn",
                                   bias_correction=True)
    y = ort_run(model, {"x": x}).reshape(-1, 5).astype(np.float64)
    err_plain = y - ort_run(onnx.load(tmp_path / "plain.onnx"), {"x": x}).reshape(-1, 5)
    err_corrected = y - ort_run(onnx.load(tmp_path / "c.onnx"), {"x": x}).reshape(-1, 5)
    assert np.abs(err_plain.mean(axis=0)).max() > 1e-2
    np.testing.assert_allclose(err_corrected.mean(axis=0), 0.0, atol=1e-4)
    # folded into the layer's bias where it has one (Gemm's C with beta, the Add after a MatMul)
    extra_nodes = 0 if any(i.name in ("C", "b") for i in model.graph.initializer) else 1
    nodes = {name: len(onnx.load(tmp_path / f"{name}.onnx").graph.node) for name in ("plain", "c")}
    assert nodes["c"] == nodes["plain"] + extra_nodes
    layer = corrected.layers[0]
    assert layer.cost_bias_corrected == pytest.approx((err_corrected ** 2).sum(axis=1).mean(), rel=1e-3)
    assert layer.cost_bias_corrected <= layer.cost_solved
    # the scales are searched for the error the correction leaves: no worse than plain's scales, corrected
    centered_plain = ((err_plain - err_plain.mean(axis=0)) ** 2).sum(axis=1).mean()
    assert layer.cost_bias_corrected <= centered_plain * (1 + 1e-6)


@pytest.mark.slow
def test_a_single_score_output_reports_decision_flips_not_top1(tmp_path):
    """A one-probability output always has 100% top-1 agreement: the report gives the largest
    change and the share of decisions at 0.5 that flip instead, and the mean cosine for others."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((1, 8)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["h"], transB=1, name="fc"),
                               helper.make_node("Sigmoid", ["h"], ["p"])], "score",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["B", 1])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((200, 8)).astype(np.float32)
    report = runs.quantize(model, tmp_path / "q.onnx", bits=1, calibration={"x": x}, speed=False)
    ev = report.evaluation
    y_float = 1 / (1 + np.exp(-(x.astype(np.float64) @ numpy_helper.to_array(w).T.astype(np.float64))))
    y_quant = ort_run(onnx.load(tmp_path / "q.onnx"), {"x": x})
    assert ev.top1_agreement == 1.0 and ev.decision_flips is not None
    assert ev.decision_flips == pytest.approx(((y_float > 0.5) != (y_quant > 0.5)).mean())
    assert ev.max_abs_error == pytest.approx(np.abs(y_quant - y_float).max(), rel=1e-4)
    assert "decisions at 0.5 flipped on" in report.to_text() and "top-1 agreement" not in report.to_text()
    plain = runs.quantize(mlp_model(), tmp_path / "m.onnx", calibration={"x": x}, speed=False)
    assert plain.evaluation.decision_flips is None and 0.5 < plain.evaluation.mean_cosine <= 1.0


@pytest.mark.slow
def test_sequential_says_when_no_layer_feeds_another(tmp_path):
    """Two heads on the same input: quantizing one cannot change what the other sees, so
    --sequential gives the same file as without it and the report says why."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), name) for name in ("Wa", "Wb")]
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "Wa"], ["a"], name="head_a"),
                               helper.make_node("MatMul", ["x", "Wb"], ["b"], name="head_b"),
                               helper.make_node("Add", ["a", "b"], ["y"])], "heads",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((100, 8)).astype(np.float32)
    common = dict(bits=2, calibration={"x": x}, activations="uint8", speed=False)
    runs.quantize(model, tmp_path / "plain.onnx", **common)
    sequential = runs.quantize(model, tmp_path / "seq.onnx", sequential=True, **common)
    assert (tmp_path / "plain.onnx").read_bytes() == (tmp_path / "seq.onnx").read_bytes()
    assert any("sequential calibration changes nothing here" in note for note in sequential.notes)
    chained = runs.quantize(mlp_model(), tmp_path / "mlp.onnx", calibration={"x": x}, sequential=True,
                                 speed=False)
    assert not any("changes nothing" in note for note in chained.notes)


@pytest.mark.parametrize("samples", [20, 24, 25, 40])
def test_the_report_names_a_layer_calibrated_on_no_more_vectors_than_its_inputs(tmp_path, samples):
    """A Gemm of 24 inputs calibrated on 24 samples or fewer has a singular Gram matrix: the report
    says so, naming it and its counts; on 25 or more it says nothing."""
    model = gemm_model(f=24, n=6)
    x = np.random.default_rng(1).standard_normal((samples, 24)).astype(np.float32)
    report = runs.quantize(model, tmp_path / "q.onnx", calibration={"x": x}, bits=3, speed=False)
    assert [layer.vectors for layer in report.layers] == [samples]
    notes = [note for note in report.notes if "calibration vectors" in note]
    if samples <= 24:
        layer = report.layers[0].name
        assert notes == [f"1 layer saw at most as many calibration vectors as inputs, so the rounding fits only the "
                         f"part of the input space the data spans: {layer} ({samples} for 24 inputs); calibrate on "
                         "more samples (each token, sample or Conv output position gives one vector)"]
    else:
        assert notes == []


def test_quantize_returns_the_model_in_memory_and_writes_nothing(tmp_path, monkeypatch):
    """The API on a ModelProto and a dict of arrays: no file appears, and nothing opens one for writing."""
    monkeypatch.chdir(tmp_path)
    real_open = open

    def no_writes(file, mode="r", *args, **kwargs):
        assert not set(mode) & set("wax+"), f"opened {file} for writing"
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr("builtins.open", no_writes)
    model = mlp_model()
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    config = onnx_qubo.QuantizeConfig.from_flat(bits=4, solver="rtn")
    result = onnx_qubo.evaluate(onnx_qubo.quantize(model, config, {"x": x}), {"x": x})
    assert isinstance(result.model, onnx.ModelProto) and result.report.output_path is None
    assert result.report.evaluation is not None and result.report.evaluation.top1_agreement > 0.5
    assert ort_run(result.model, {"x": x}).shape == (32, 4)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    saved = onnx_qubo.save(result, tmp_path / "q.onnx")
    assert saved.report.output_bytes == (tmp_path / "q.onnx").stat().st_size
    assert onnx.load(tmp_path / "q.onnx").SerializeToString() == result.model.SerializeToString()


def test_quantize_refuses_what_is_not_a_config():
    with pytest.raises(onnx_qubo.OptionError, match="config must be a QuantizeConfig"):
        onnx_qubo.quantize(mlp_model(), {"bits": 2}, {"x": np.zeros((4, 8), np.float32)})


def test_bad_evaluation_data_is_refused_before_the_long_run(tmp_path, monkeypatch):
    def no_quantize(*args, **kwargs):
        raise AssertionError("quantize ran before the evaluation data was checked")

    monkeypatch.setattr(onnx_qubo.api, "quantize", no_quantize)
    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    with pytest.raises(onnx_qubo.DataError, match=r"input 'x' has shape \(16, 5\)"):
        onnx_qubo.api.run(mlp_model(widths=(8, 4)), tmp_path / "q.onnx", calibration={"x": x},
                          evaluation={"x": x[:, :5]})
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("embeddings", [False, True])
def test_the_wider_storage_note_suggests_a_mix_only_where_the_options_allow_one(tmp_path, embeddings):
    """--bits-per-weight refuses --embeddings (config.py): the note then stops at the size."""
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    report = runs.quantize(mlp_model(widths=(64, 32, 8)), tmp_path / "q.onnx", bits=3, calibration={"x": x},
                           embeddings=embeddings, granularity="block", block_size=32, speed=False)
    note = next(note for note in report.notes if "codes stored in" in note)
    assert note.endswith("(--pack-codes writes the larger ones at 3 bits)") == embeddings
    assert ("--bits 2 with --bits-per-weight" in note) != embeddings


@pytest.mark.parametrize("bits, form, level, expected, stored", [
    (3, "qdq", None, "1 layer of 3-bit codes stored in 4-bit integers", 4),
    (6, "qdq", None, "2 layers of 6-bit codes stored in 8-bit integers", 8),
    (4, "qdq", None, None, 4), (2, "qdq", None, None, 2),
    (2, "ort", None, None, 2),  # auto: accuracy level 4, where the 2-bit kernel is fast
    (2, "ort", 0, "1 layer of 2-bit codes stored in 4-bit MatMulNBits weights", 4),
    (3, "ort", None, "1 layer of 3-bit codes stored in 4-bit MatMulNBits weights (onnxruntime has no 3-bit "
                     "MatMulNBits)", 4)])
def test_the_report_says_where_codes_take_a_wider_type(tmp_path, bits, form, level, expected, stored):
    """--bits 3 stores INT4 (ONNX has no 3-bit type) or 4-bit MatMulNBits weights: as large as 4
    bits, which the notes say; 2-bit codes take MatMulNBits' 2-bit weights where its kernel is
    fast; the head at 4 bits (--head-bits below 4) is stored as it is and not counted."""
    model = mlp_model(widths=(64, 32, 8))
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    report = runs.quantize(model, tmp_path / "q.onnx", bits=bits, calibration={"x": x}, format=form,
                           granularity="block", block_size=32, speed=False, ort_accuracy_level=level)
    wider = [note for note in report.notes if "codes stored in" in note]
    assert wider == ([] if expected is None else [next(n for n in wider if n.startswith(expected))])
    assert [layer.stored_bits for layer in report.layers] == [stored, 4 if bits < 4 else {4: 4, 6: 8}[bits]]
    written = onnx.load(tmp_path / "q.onnx")
    nbits = [next(a.i for a in n.attribute if a.name == "bits") for n in written.graph.node
             if n.op_type == "MatMulNBits"]
    assert nbits == ([] if form == "qdq" else [stored, 4])


@pytest.mark.parametrize("f, options, expected", [
    (96, dict(bits=2, format="ort", block_size=64), "1 MatMulNBits layer pads each row to whole blocks (K = 96 -> "
     "128): 33% more codes in those layers, for no weight; --block-size 32 divides it: no padding, finer scales"),
    (96, dict(bits=4, format="ort", block_size=64), "1 MatMulNBits layer pads each row to whole blocks (K = 96 -> "
     "128): 33% more codes in those layers, for no weight; --block-size 32 divides it: no padding, finer scales"),
    (96, dict(bits=2, format="ort", block_size=32), None),
    (96, dict(bits=2, format="qdq", block_size=64), None),  # DequantizeLinear stores K codes per row
    (100, dict(bits=4, format="ort"), None)])  # a scale per row: padding its last kernel block is the cheaper way
def test_the_report_says_where_matmul_nbits_pads_rows(tmp_path, f, options, expected):
    """MatMulNBits stores whole blocks: a layer whose input count K its blocks do not divide is
    padded (the file holds the padded codes), which the notes say, with a block size that divides K."""
    x = np.random.default_rng(0).standard_normal((32, f)).astype(np.float32)
    granularity = dict(granularity="block") if "block_size" in options else {}
    report = runs.quantize(matmul_model(f=f, n=8), tmp_path / "q.onnx", calibration={"x": x}, solver="rtn",
                           head_bits=options["bits"], speed=False, **granularity, **options)
    assert [note for note in report.notes if "pads each row" in note] == ([] if expected is None else [expected])
    written = onnx.load(tmp_path / "q.onnx")
    shapes = {i.name: list(i.dims) for i in written.graph.initializer}
    stored = [shapes[n.input[1]] for n in written.graph.node if n.op_type == "MatMulNBits"]
    if options["format"] == "ort":  # [N, blocks, bytes per block]: the padded codes in the file
        block = next(a.i for n in written.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                     if a.name == "block_size")
        assert stored == [[8, -(-f // block), block * report.layers[0].stored_bits // 8]]
        assert (expected is None) == (f % block == 0 or "block_size" not in options)


def test_the_int8_kernels_weights_are_counted_at_8_bits(tmp_path):
    """With quantized activations format ort writes MatMulIntegerToFloat, whose weights are int8
    whatever the codes' width: the report counts them so, and its notes say why."""
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    report = runs.quantize(mlp_model(widths=(64, 32, 8)), tmp_path / "q.onnx", bits=4, activations="uint8",
                           calibration={"x": x}, format="ort", speed=False)
    assert [(layer.kernel, layer.stored_bits) for layer in report.layers] == [("MatMulIntegerToFloat", 8)] * 2
    assert "2 layers of 4-bit codes stored in 8-bit MatMulIntegerToFloat weights (the kernel takes 8-bit weights " \
           "only): as large as at 8 bits" in report.notes


def test_top1_agreement_says_what_it_compares_when_an_output_has_several_rows_per_sample(tmp_path):
    """A detector's [N, 22, 2100] or a segmenter's map is no class score: the report says the
    argmax runs over the last axis in each row, so a low agreement is read for what it is."""
    x = np.random.default_rng(0).standard_normal((20, 3, 12)).astype(np.float32)
    report = runs.quantize(matmul_model(f=12, n=7, leading=(3,)), tmp_path / "q.onnx", bits=4,
                           calibration={"x": x}, evaluation={"x": x}, speed=False)
    assert (report.evaluation.argmax_rows, report.evaluation.argmax_width) == (60, 7)
    assert "top-1 agreement with float (argmax over the last axis, 7 wide, in each of 60 rows): " in report.to_text()
    flat = runs.quantize(matmul_model(f=12, n=7), tmp_path / "f.onnx", bits=4, calibration={"x": x[:, 0]},
                         evaluation={"x": x[:, 0]}, speed=False)
    assert "top-1 agreement with float: " in flat.to_text()


@pytest.mark.parametrize("quantized_ms, activations, noted", [(2.0, "none", True), (0.5, "none", False),
                                                              (2.0, "uint8", False)])
def test_a_portable_file_slower_than_float_names_the_session_option_that_folds_its_weights(
        quantized_ms, activations, noted, tmp_path, monkeypatch):
    """The note is decided from the timing (here fixed, 1 ms float), not measured in a test."""
    from onnx_qubo import api
    from onnx_qubo.core.report import Speed

    monkeypatch.setattr(api, "time_models", lambda *args: Speed(8, 1.0, 4.0, quantized_ms, 4.0 * quantized_ms))
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    report = runs.quantize(mlp_model(), tmp_path / "q.onnx", bits=4, activations=activations, calibration={"x": x})
    assert any(api.FOLD_WEIGHTS_OPTION in note for note in report.notes) == noted
