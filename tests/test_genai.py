"""Models built by onnxruntime-genai's model builder (models/tiny_lm: a 2-layer random-weight
Llama made by models/make_tiny_lm.py; models/tiny_lm_fp16: the same weights built with ``-p
fp16``): inspected, quantized from token windows alone, written as a complete onnxruntime-genai
folder that og.Generator runs, and the kernel model checked against the portable
DequantizeLinear model of the same codes run unoptimized."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import runs
from click.testing import CliRunner
from onnx import TensorProto, helper
from test_refusals import BadInput, assert_refused

import onnx_qubo
from onnx_qubo.calibration.data import load_dataset
from onnx_qubo.cli import main
from onnx_qubo.core.errors import DataError
from onnx_qubo.graph.files import load_model
from onnx_qubo.passes import online_rotations

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny_lm"
MODEL = TINY / "model.onnx"
LAYERS = [f"/model/layers.{i}/{part}/MatMul" for i in range(2)
          for part in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")]
TOKENS = np.load(TINY / "model.eval.npz")["input_ids"][:4, :24]
HALF = TINY.parent / "tiny_lm_fp16"  # q, k and v as separate MatMuls; the past read through a Concat

try:
    import onnxruntime_genai as og
except ImportError:  # the optional extra 'genai'
    og = None


def test_inspect_finds_the_builders_matmuls_and_the_tied_head():
    result = CliRunner().invoke(main, ["inspect", str(MODEL)])
    assert result.exit_code == 0, result.output
    for name in [*LAYERS, "/lm_head/MatMul"]:
        assert name in result.output
    assert "11 dense layer(s)" in result.output and "skipped" not in result.output


def test_inputs_beside_the_tokens_are_made_an_empty_past_ones_and_positions():
    model = load_model(MODEL)
    data = load_dataset({"input_ids": TOKENS}, model, batch_size=3)
    first = data.batches[0]
    assert [data.samples(b) for b in data.batches] == [3, 1]
    assert np.array_equal(first["attention_mask"], np.ones((3, 24), np.int64))
    past = [name for name in first if name.startswith("past_key_values")]
    assert len(past) == 4 and all(first[name].shape == (3, 2, 0, 16) for name in past)
    assert all(first[name].dtype == np.float32 for name in past)
    positions = _toy_lm(positions=True)
    with pytest.raises(DataError, match=r"input 'past_key_values.0.key'.*axis 3 \('kv_cache_dim'\)"):
        load_dataset({"input_ids": TOKENS}, positions)
    made = load_dataset({"input_ids": TOKENS, "past_key_values.0.key": np.zeros((4, 2, 0, 8), np.float32)},
                        positions).batches[0]
    assert np.array_equal(made["position_ids"], np.tile(np.arange(24), (4, 1)))


def _toy_lm(positions: bool) -> onnx.ModelProto:
    """input_ids, position_ids, a past input [batch, 2, past_sequence_length, kv_cache_dim] that
    no attention node reads."""
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT,
                                            ["batch_size", 2, "past_sequence_length", "kv_cache_dim"])]
    nodes = [helper.make_node("Identity", ["input_ids"], ["y"])]
    if positions:
        inputs.append(helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "seq"]))
    graph = helper.make_graph(nodes, "toy", inputs, [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _logits(path: Path, level: ort.GraphOptimizationLevel) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = load_dataset({"input_ids": TOKENS}, load_model(path)).batches[0]
    return session.run(["logits"], feeds)[0]


def _generate(folder: Path, count: int) -> list[int]:
    model = og.Model(str(folder))
    prompt = list(og.Tokenizer(model).encode("The quick brown fox jumps over the lazy dog."))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + count, min_length=len(prompt) + count)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def _assert_fast_equals_portable(written: dict[str, Path]) -> None:
    """The ``ort`` file's logits at onnxruntime's default and basic levels equal the ``qdq`` file's
    (the same codes) run unoptimized; then skip when onnxruntime-genai is missing (generation next)."""
    reference = _logits(written["qdq"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        np.testing.assert_allclose(_logits(written["ort"], level), reference, rtol=1e-4,
                                   atol=1e-4 * np.abs(reference).max())
    if og is None:
        pytest.skip("onnxruntime-genai is not installed (pip install 'onnx-qubo[genai]'): generation not checked")


@pytest.mark.parametrize("bits", [4, pytest.param(2, marks=pytest.mark.slow)])
def test_quantized_folder_runs_in_onnxruntime_genai_and_equals_the_portable_model(bits, tmp_path):
    written = {}
    for format in ("qdq", "ort"):
        folder = tmp_path / format
        folder.mkdir()
        written[format] = folder / "model_q.onnx"
        exact = {"ort_accuracy_level": 0} if format == "ort" else {}  # float compute: equal to the portable model
        report = runs.quantize(str(MODEL), written[format], bits=bits, granularity="block", block_size=32,
                               format=format, embeddings=bits == 4, speed=False, **exact)
        assert {layer.name for layer in report.layers} >= {*LAYERS, "/lm_head/MatMul"}
        config = json.loads((folder / "genai_config.json").read_text())
        assert config["model"]["decoder"]["filename"] == "model_q.onnx"
        assert (folder / "tokenizer.json").read_bytes() == (TINY / "tokenizer.json").read_bytes()
        assert not (folder / "model.calib.npz").exists()
    kernels = onnx.load(str(written["ort"]))
    nbits = [n for n in kernels.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 11
    assert all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in nbits)
    assert any(n.op_type == "GatherBlockQuantized" for n in kernels.graph.node) == (bits == 4)
    assert any(n.name in online_rotations(kernels) for n in kernels.graph.node) == (bits < 4)  # rotate auto: whole
    _assert_fast_equals_portable(written)
    for format in ("qdq", "ort"):
        tokens = _generate(written[format].parent, 12)
        assert len(tokens) == 12 and all(0 <= t < 512 for t in tokens)


def test_a_residual_stream_turned_as_one_runs_in_both_formats_and_equals_the_portable_model(tmp_path):
    """--rotate-residual: the q/k/v, gate/up and head projections read their norms directly (the
    gains moved into them); the fast format equals the portable model of the same codes."""
    written = {}
    for format in ("qdq", "ort"):
        (tmp_path / format).mkdir()
        written[format] = tmp_path / format / "model_q.onnx"
        runs.quantize(str(MODEL), written[format], bits=3, granularity="block", block_size=32, format=format,
                      rotate="whole", rotate_residual=True, ort_accuracy_level=0, speed=False)
    kernels = onnx.load(str(written["ort"]))
    producers = {out: node for node in kernels.graph.node for out in node.output}
    nbits = [n for n in kernels.graph.node if n.op_type == "MatMulNBits"]
    direct = [n.name for n in nbits if producers[n.input[0]].op_type.endswith("SimplifiedLayerNormalization")]
    assert len(nbits) == 11 and len(direct) == 7  # qkv and gate/up per block, and the head
    _assert_fast_equals_portable(written)
    assert len(_generate(written["ort"].parent, 8)) == 8


@pytest.mark.slow
def test_a_2_bit_language_model_takes_the_2_bit_kernel_and_runs_in_onnxruntime_genai(tmp_path):
    """--format ort at 2 bits: a language model's accuracy level 4 lets its 2-bit layers take
    onnxruntime's 2-bit MatMulNBits (the head and table stay at 4 bits); the logits differ from
    the portable model's only by the kernel's int8 activations, at both levels; og.Generator runs it."""
    written = {}
    for format in ("qdq", "ort"):
        (tmp_path / format).mkdir()
        written[format] = tmp_path / format / "model_q.onnx"
        report = runs.quantize(str(MODEL), written[format], bits=2, granularity="block", block_size=32,
                               format=format, embeddings=True, speed=False)
    rows = {layer.name: layer for layer in report.layers}
    assert all((rows[name].kernel, rows[name].stored_bits) == ("MatMulNBits", 2) for name in LAYERS)
    assert rows["/lm_head/MatMul"].stored_bits == 4
    nbits = [{a.name: a.i for a in n.attribute}["bits"] for n in onnx.load(str(written["ort"])).graph.node
             if n.op_type == "MatMulNBits"]
    assert sorted(nbits) == [2] * 10 + [4]
    reference = _logits(written["qdq"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        logits = _logits(written["ort"], level)  # int8 activations: the 4-bit kernel at level 4 is 3.8% off too
        assert np.linalg.norm(logits - reference) / np.linalg.norm(reference) < 0.06
    if og is None:
        pytest.skip("onnxruntime-genai is not installed (pip install 'onnx-qubo[genai]'): generation not checked")
    tokens = _generate(written["ort"].parent, 12)
    assert len(tokens) == 12 and all(0 <= t < 512 for t in tokens)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}


@pytest.mark.slow
def test_a_half_precision_model_is_quantized_with_half_scales_and_runs_in_onnxruntime_genai(tmp_path):
    """The builder's fp16 model: FLOAT16 weights quantized, their scales stored as FLOAT16 (what
    DequantizeLinear and MatMulNBits then compute in), the codes and scales of both forms read back
    equal, the kernel model equal to the unoptimized portable one at the default and basic levels,
    and both forms generate in og.Generator."""
    layers = [f"/model/layers.{i}/{part}/MatMul" for i in range(2)
              for part in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
                           "mlp/up_proj", "mlp/down_proj")] + ["/lm_head/MatMul"]
    data = load_dataset({"input_ids": TOKENS}, load_model(HALF / "model.onnx")).batches[0]
    assert all(data[f"past_key_values.{i}.{kv}"].shape == (4, 2, 0, 16) for i in range(2) for kv in ("key", "value"))
    written, errors = {}, {}
    for format, source in (("qdq", HALF), ("ort", HALF), ("fp32", TINY)):
        (tmp_path / format).mkdir()
        written[format] = tmp_path / format / "model.onnx"
        exact = {"ort_accuracy_level": 0} if format == "ort" else {}
        report = runs.quantize(str(source / "model.onnx"), written[format], bits=4, granularity="block",
                               block_size=32, format="ort" if format == "ort" else "qdq", embeddings=True,
                               speed=False, evaluation=source / "model.eval.npz", **exact)
        assert report.evaluation is not None
        errors[format] = report.evaluation.relative_output_error
        if format != "fp32":
            assert [layer.name for layer in report.layers if layer.form != "Gather (table)"] == layers
    assert errors["qdq"] < 1.05 * errors["fp32"]  # half precision loses nothing that matters to the rounding
    portable, kernels = (onnx.load(str(written[f])) for f in ("qdq", "ort"))
    portable_inits, kernel_inits = _initializers(written["qdq"]), _initializers(written["ort"])
    dq = {n.input[0]: n for n in portable.graph.node if n.op_type == "DequantizeLinear"}
    nbits = {n.name: n for n in kernels.graph.node if n.op_type == "MatMulNBits"}
    assert len(nbits) == len(layers) and len(dq) == len(layers)
    assert all(kernel_inits[n.input[2]].dtype == np.float16 for n in nbits.values())
    assert all(portable_inits[n.input[1]].dtype == np.float16 for n in dq.values())
    head = next(n for n in nbits.values() if n.output[0] == "logits")  # the head's codes, read back from both files
    codes = next(c for c in dq if "lm_head" in c)
    unpacked = np.stack([kernel_inits[head.input[1]] & 15, kernel_inits[head.input[1]] >> 4], axis=-1)
    v = unpacked.shape[0]
    offset = 0 if len(dq[codes].input) > 2 else 8  # MatMulNBits stores signed codes + 8 (zero point 8)
    assert np.array_equal(unpacked.reshape(v, -1)[:, :64].astype(np.int64) - offset,
                          portable_inits[codes].astype(np.int64))
    assert np.array_equal(kernel_inits[head.input[2]].reshape(v, -1), portable_inits[dq[codes].input[1]])
    reference = _logits(written["qdq"], ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    assert reference.dtype == np.float16
    reference = reference.astype(np.float32)
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_BASIC):
        difference = _logits(written["ort"], level).astype(np.float32) - reference  # float16 activations' rounding:
        assert np.linalg.norm(difference) < 5e-3 * np.linalg.norm(reference)  # the fp16 float model is 3.3e-3 from fp32
        assert np.abs(difference).max() < 1e-2 * np.abs(reference).max()
    if og is None:
        pytest.skip("onnxruntime-genai is not installed (pip install 'onnx-qubo[genai]'): generation not checked")
    for format in ("qdq", "ort"):  # (the builder's own fp16 model fails at its second token: see docs/llm.md)
        tokens = _generate(written[format].parent, 12)
        assert len(tokens) == 12 and all(0 <= t < 512 for t in tokens)


@pytest.mark.parametrize("option, message", [
    ({"activations": "int8"}, "--activations int8 quantizes float32 inputs; layer '/model/layers.0/attn/q_proj/MatMul' "
                              "computes in float16"),
    ({"rotate": "hadamard"}, "--rotate hadamard rotates FLOAT weights only; layer '/model/layers.0/attn/q_proj/MatMul' "
                             "has FLOAT16 weights"),
    ({"rotate": "whole"}, "--rotate whole rotates FLOAT weights only; layer '/model/layers.0/attn/q_proj/MatMul' "
                          "has FLOAT16 weights"),
])
def test_what_a_half_precision_model_cannot_take_is_refused_by_name(option, message, tmp_path):
    result = CliRunner().invoke(main, [str(HALF / "model.onnx"), str(tmp_path / "q.onnx"), "--bits", "4",
                                       *[x for k, v in option.items() for x in (f"--{k}", v)]])
    assert result.exit_code == 1 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_output_in_the_input_folder_leaves_its_genai_files_as_they_are(tmp_path):
    folder = tmp_path / "lm"
    shutil.copytree(TINY, folder)
    config = (folder / "genai_config.json").read_bytes()
    report = runs.quantize(str(folder / "model.onnx"), folder / "model_q.onnx", bits=4, solver="rtn",
                                speed=False)
    assert (folder / "genai_config.json").read_bytes() == config
    assert any("left as they are" in note for note in report.notes)
    elsewhere = tmp_path / "out"
    elsewhere.mkdir()
    with pytest.raises(onnx_qubo.QuboInputError, match="onnxruntime-genai file .*tokenizer.json.* report"):
        runs.quantize(str(folder / "model.onnx"), elsewhere / "q.onnx", bits=4, solver="rtn", speed=False,
                           report_path=elsewhere / "tokenizer.json")
    assert sorted(p.name for p in elsewhere.iterdir()) == []


def test_a_tied_head_read_through_a_transpose_gets_a_table_of_its_own():
    from onnx import numpy_helper

    from onnx_qubo.passes import FoldConstantWeights, run_passes

    head = np.random.default_rng(0).normal(size=(8, 20)).astype(np.float32)  # [d, V], as the builder stores it
    nodes = [helper.make_node("Transpose", ["W"], ["table"], perm=[1, 0]),
             helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "W"], ["logits"], name="head")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 20])],
                              [numpy_helper.from_array(head, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folded = run_passes(model, [FoldConstantWeights()]).model
    inits = {init.name: numpy_helper.to_array(init) for init in folded.graph.initializer}
    assert [n.op_type for n in folded.graph.node] == ["Gather", "MatMul"]
    assert np.array_equal(inits["table"], head.T) and np.array_equal(inits["W"], head)
    ids = np.array([[3, 19, 0]], np.int64)
    runs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
            for m in (model, folded)]
    assert np.array_equal(runs[0], runs[1])


def test_a_calibration_reader_of_token_windows_gets_the_other_inputs_too():
    class Reader:
        def __init__(self) -> None:
            self.batches = iter([{"input_ids": TOKENS[:2]}, {"input_ids": TOKENS[2:]}])

        def get_next(self):
            return next(self.batches, None)

    data = load_dataset(Reader(), load_model(MODEL))
    assert [sorted(b) for b in data.batches] == [sorted(load_dataset({"input_ids": TOKENS}, load_model(MODEL))
                                                        .batches[0])] * 2
    assert data.batches[1]["past_key_values.1.value"].shape == (2, 2, 0, 16)


def _tiny_copy(folder: Path, windows: np.ndarray, shapeless_past: bool = False) -> list:
    """The tiny LM's folder copied to ``folder`` with ``windows`` as its calibration data."""
    shutil.copytree(TINY, folder, dirs_exist_ok=True)
    np.savez(folder / "model.calib.npz", input_ids=windows)
    if shapeless_past:
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for graph_input in model.graph.input:
            if graph_input.name.startswith("past_key_values"):
                graph_input.type.tensor_type.ClearField("shape")
        (folder / "model.onnx").write_bytes(model.SerializeToString())
    return [folder / "model.onnx", folder / "out" / "q.onnx", "--bits", "4", "--solver", "rtn"]


def _out_folder(setup):
    def made(folder: Path) -> list:
        args = setup(folder)
        (folder / "out").mkdir()
        return args
    return made


BAD_INPUTS = [  # shown in docs/bad_inputs.md
    BadInput("calibration windows longer than a language model's context",
             _out_folder(lambda d: _tiny_copy(d, np.ones((2, 300), np.int64))),
             "input 'input_ids' holds windows of 300 tokens, longer than the model's context of 256 positions (its "
             "rotary cos/sin caches); cut the text into windows of at most 256 tokens"),
    BadInput("a KV-cache input whose shape the model does not declare",
             _out_folder(lambda d: _tiny_copy(d, TOKENS, shapeless_past=True)),
             "input 'past_key_values.0.key' is a KV cache (an attention node reads it as its past) but the model "
             "declares no shape for it, so no empty past can be made from 'input_ids'"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.title for c in BAD_INPUTS])
def test_bad_language_model_input_is_refused_in_one_line_and_nothing_changes(case, tmp_path):
    assert_refused(case, tmp_path)


def test_format_ort_defaults_to_accuracy_level_4_for_a_language_model_only(tmp_path):
    """auto: MatMulNBits computes with int8 activations in a language model, as the genai builder
    writes it (its fast path for decoding), and in float elsewhere."""
    from onnx_qubo.api import quantize
    from onnx_qubo.config import QuantizeConfig

    from graphs import mlp_model

    config = QuantizeConfig.from_flat({"bits": 4, "solver": "rtn", "format": "ort"})
    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    for model, data, level in ((str(MODEL), None, 4), (mlp_model(widths=(8, 16)), {"x": x}, 0)):
        result = quantize(model, config, data)
        levels = {a.i for n in result.model.graph.node if n.op_type == "MatMulNBits"
                  for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {level} and result.config.output.ort_accuracy_level == level
        assert config.output.ort_accuracy_level is None


@pytest.mark.slow
def test_a_float32_language_model_below_4_bits_gets_the_low_bit_recipe_by_default():
    """damping unset: 0.01 for a language model; rotate and scale auto: whole and fit for one with
    float32 weights below 4 bits (docs/llm.md measured them on SmolLM2-135M); else none and mse, and
    damping auto below 4 bits, 0 at 4; each explicit option wins alone; a half-precision model is
    not rotated (and not refused)."""
    from onnx_qubo.api import quantize
    from onnx_qubo.config import QuantizeConfig

    from graphs import mlp_model

    x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    half = {"input_ids": TOKENS}
    cases = [(str(MODEL), None, {"bits": 3}, ("whole", "fit", 0.01)),
             (str(MODEL), None, {"bits": 4}, ("none", "mse", 0.01)),
             (str(MODEL), None, {"bits": 2, "rotate": "none"}, ("none", "fit", 0.01)),
             (str(MODEL), None, {"bits": 2, "scale": "mse", "damping": 0}, ("whole", "mse", 0.0)),
             (str(MODEL), None, {"bits": 2, "rotate": "hadamard"}, ("hadamard", "fit", 0.01)),
             (str(HALF / "model.onnx"), half, {"bits": 2}, ("none", "mse", 0.01)),
             (mlp_model(widths=(8, 16)), {"x": x}, {"bits": 2}, ("none", "mse", "auto")),
             (mlp_model(widths=(8, 16)), {"x": x}, {"bits": 4}, ("none", "mse", 0.0))]
    for model, data, options, expected in cases:
        config = QuantizeConfig.from_flat({"solver": "rtn", **options})
        result = quantize(model, config, data)
        rounding = result.config.rounding
        assert (str(rounding.rotate), str(rounding.scale), rounding.damping) == expected, options
        rotation, scale, damping = expected
        assert result.report.scale == scale and ("inputs rotated" in result.report.scheme) == (rotation != "none")
        assert ("damped by 0.01" in result.report.scheme) == (damping == 0.01)
        assert ("damped per layer" in result.report.scheme) == (damping == "auto")
        online = [node for node in result.model.graph.node if "rotated" in node.name]
        assert bool(online) == (rotation != "none")
