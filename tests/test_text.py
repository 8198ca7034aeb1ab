"""Language models from text: ``onnx-qubo tokenize`` (token windows made with a model folder's
tokenizer.json) and next-token perplexity in the report, streamed in pieces (perplexity.py),
checked against numpy on a tiny LM built here (Gather embedding + MatMul to vocabulary logits)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import runs
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from test_refusals import BadInput, assert_refused

from onnx_qubo.calibration.text import cut_windows, token_windows
from onnx_qubo.cli import main
from onnx_qubo.core.errors import DataError, OptionError
from onnx_qubo.evaluation import perplexity
from onnx_qubo.evaluation.perplexity import language_model, next_token_nll

WORDS = [f"w{k}" for k in range(40)]
VOCAB = len(WORDS) + 1  # [UNK] first


def lm_model(vocab: int = VOCAB, width: int = 16, seed: int = 0, out: int | None = None,
             ) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """input_ids [batch, seq] -> Gather(table) -> MatMul(W) -> logits [batch, seq, vocab] (``out``
    wide instead: an encoder's hidden states); also the table and W for numpy."""
    rng = np.random.default_rng(seed)
    out = vocab if out is None else out
    table = rng.normal(size=(vocab, width)).astype(np.float32)
    weight = rng.normal(size=(width, out)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["emb"], name="embed", axis=0),
             helper.make_node("MatMul", ["emb", "W"], ["logits"], name="lm_head")]
    graph = helper.make_graph(
        nodes, "tiny_lm", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", out])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model, table, weight


def numpy_perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp(mean cross entropy) of logits[:, t] predicting ids[:, t + 1], all windows at once."""
    z = logits[:, :-1].astype(np.float64)
    log_probs = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    picked = np.take_along_axis(log_probs, ids[:, 1:, None], axis=-1)
    return float(np.exp(-picked.mean()))


def write_tokenizer(path) -> None:
    """A word-level tokenizer.json over WORDS (offline, with the tokenizers library)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, **{word: k + 1 for k, word in enumerate(WORDS)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))


def make_folder(path: Path) -> Path:
    """A model folder: the tiny LM, its tokenizer.json, and a text of 600 words."""
    write_tokenizer(path / "tokenizer.json")
    onnx.save(lm_model()[0], path / "model.onnx")
    words = np.random.default_rng(1).integers(0, len(WORDS), size=600)
    (path / "text.txt").write_text(" ".join(WORDS[w] for w in words) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path):
    return make_folder(tmp_path)


# ---- tokenize ---------------------------------------------------------------------------------

def test_tokenize_writes_windows_of_the_text_and_skip_starts_after_the_calibration_windows(folder):
    ids = np.array([WORDS.index(w) + 1 for w in (folder / "text.txt").read_text().split()])
    runner = CliRunner()
    calib = runner.invoke(main, ["tokenize", str(folder), str(folder / "text.txt"), str(folder / "c.npz"),
                                 "--window", "32", "--windows", "4"])
    evaluation = runner.invoke(main, ["tokenize", str(folder / "tokenizer.json"), str(folder / "text.txt"),
                                      str(folder / "e.npz"), "--window", "32", "--windows", "3", "--skip", "4"])
    assert calib.exit_code == 0 and evaluation.exit_code == 0, calib.output + evaluation.output
    c, e = np.load(folder / "c.npz")["input_ids"], np.load(folder / "e.npz")["input_ids"]
    assert c.dtype == np.int64 and c.shape == (4, 32) and e.shape == (3, 32)
    np.testing.assert_array_equal(c, ids[:128].reshape(4, 32))
    np.testing.assert_array_equal(e, ids[128:224].reshape(3, 32))  # right after the calibration windows
    strided = token_windows(folder, folder / "text.txt", window=8, windows=3, stride=5, skip=2)
    np.testing.assert_array_equal(strided, np.stack([ids[10:18], ids[15:23], ids[20:28]]))


def test_tokenize_refuses_short_text_bad_options_and_never_writes_over_its_inputs(folder):
    runner = CliRunner()
    text = folder / "text.txt"
    before = text.read_bytes(), (folder / "tokenizer.json").read_bytes()
    short = runner.invoke(main, ["tokenize", str(folder), str(text), str(folder / "o.npz"), "--window", "100",
                                 "--windows", "5", "--skip", "2"])
    assert short.exit_code == 1 and "holds 600 tokens" in short.output and "need 700" in short.output
    for target in (text, folder / "tokenizer.json"):
        result = runner.invoke(main, ["tokenize", str(folder), str(text), str(target), "--window", "8",
                                      "--windows", "1"])
        assert result.exit_code == 1 and "this run reads" in result.output, result.output
    missing = runner.invoke(main, ["tokenize", str(folder / "nope"), str(text), str(folder / "o.npz"),
                                   "--window", "8", "--windows", "1"])
    assert missing.exit_code == 1 and "tokenizer" in missing.output and "does not exist" in missing.output
    assert runner.invoke(main, ["tokenize", str(folder), str(text), str(folder / "o.npz"), "--window", "1",
                                "--windows", "1"]).exit_code == 2  # a window scores no next token
    assert not (folder / "o.npz").exists()
    assert (text.read_bytes(), (folder / "tokenizer.json").read_bytes()) == before
    with pytest.raises(OptionError, match="stride"):
        cut_windows(np.arange(10), 4, 1, stride=0)


def test_tokenize_without_the_tokenizers_package_names_the_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails as when it is not installed
    result = CliRunner().invoke(main, ["tokenize", str(folder), str(folder / "text.txt"), str(folder / "o.npz"),
                                       "--window", "8", "--windows", "1"])
    assert result.exit_code == 1 and "onnx-qubo[text]" in result.output and "Traceback" not in result.output
    assert not (folder / "o.npz").exists()


# ---- perplexity -------------------------------------------------------------------------------

def test_next_token_nll_in_chunks_is_the_cross_entropy_of_the_shifted_tokens(monkeypatch):
    rng = np.random.default_rng(0)
    logits = (30 * rng.normal(size=(3, 7, 11))).astype(np.float32)  # large: a naive softmax overflows
    ids = rng.integers(0, 11, size=(3, 7))
    monkeypatch.setattr(perplexity, "CHUNK_VALUES", 25)  # 2 rows a chunk: windows cut in several chunks
    total, count = next_token_nll(logits, ids)
    assert count == 3 * 6
    assert np.exp(total / count) == pytest.approx(numpy_perplexity(logits, ids), rel=1e-12)


def test_language_models_are_found_by_input_ids_and_rank_3_logits():
    model = lm_model()[0]
    assert language_model(model) == perplexity.LanguageModel("input_ids", "logits", VOCAB)
    model.graph.input[0].name = "ids"
    assert language_model(model) is None
    assert language_model(lm_model(out=16)[0]) is None  # [batch, seq, width]: hidden states, not logits
    tied = lm_model()[0]  # the genai builder's tied head: the table is the Transpose of lm_head's weight
    tied.graph.node.insert(0, helper.make_node("Transpose", ["W"], ["table_t"], perm=[1, 0]))
    tied.graph.node[1].input[0] = "table_t"
    assert language_model(tied) == perplexity.LanguageModel("input_ids", "logits", VOCAB)


@pytest.mark.slow
def test_quantize_reports_perplexity_streamed_in_pieces_as_numpy_computes_it(tmp_path, monkeypatch):
    model, table, weight = lm_model()
    rng = np.random.default_rng(2)
    calib, evaluation = rng.integers(0, VOCAB, size=(16, 12)), rng.integers(0, VOCAB, size=(7, 12))
    monkeypatch.setattr(perplexity, "LOGITS_BYTES", 2 * 12 * VOCAB * 4)  # two windows a run
    monkeypatch.setattr(perplexity, "CHUNK_VALUES", 5 * VOCAB)  # windows cut in chunks of rows
    sizes = []
    real = perplexity.run_session
    monkeypatch.setattr(perplexity, "run_session", lambda s, o, feed, *a: sizes.append(len(feed["input_ids"]))
                        or real(s, o, feed, *a))
    monkeypatch.setattr(perplexity, "LEVEL_WINDOWS", 4)
    out = tmp_path / "q.onnx"
    report = runs.quantize(model, out, bits=4, calibration={"input_ids": calib},
                           evaluation={"input_ids": evaluation}, batch_size=3, speed=False,
                           report_path=tmp_path / "r.json")
    # 2 models on the 7 windows, then 3 level checks on the first 4; batches of 3 split in runs of 2
    assert sizes and max(sizes) <= 2 and sum(sizes) == 7 * 2 + 4 * 3
    ev = report.evaluation
    assert ev.float_perplexity == pytest.approx(numpy_perplexity(table[evaluation] @ weight, evaluation), rel=1e-5)
    quantized = ort.InferenceSession(str(out)).run(["logits"], {"input_ids": evaluation})[0]
    assert ev.quantized_perplexity == pytest.approx(numpy_perplexity(quantized, evaluation), rel=1e-9)
    assert ev.predictions == 7 * 11 and ev.samples == 7 and ev.output == "logits"
    assert ev.quantized_perplexity != ev.float_perplexity
    float_logits = (table[evaluation] @ weight).reshape(-1, VOCAB)
    agreement = (float_logits.argmax(1) == quantized.reshape(-1, VOCAB).argmax(1)).mean()
    assert ev.top1_agreement == pytest.approx(agreement)
    relative = np.linalg.norm(quantized.reshape(-1, VOCAB) - float_logits) / np.linalg.norm(float_logits)
    assert ev.relative_output_error == pytest.approx(relative, rel=1e-4)
    text = report.to_text()
    assert "perplexity on 77 next tokens of 7 windows" in text and "quantized" in text
    assert ev.level_samples == 4 and "on the first 4 windows" in text
    saved = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert saved["float_perplexity"] == ev.float_perplexity and saved["quantized_perplexity"] == ev.quantized_perplexity


def test_token_ids_outside_the_vocabulary_are_refused_before_anything_is_written(tmp_path):
    model = lm_model()[0]
    for bad in (VOCAB, -1):
        ids = np.zeros((4, 6), np.int64)
        ids[2, 3] = bad
        with pytest.raises(DataError, match=f"token id {bad}, outside the model's vocabulary of {VOCAB}"):
            runs.quantize(model, tmp_path / "q.onnx", bits=4, calibration={"input_ids": ids}, speed=False)
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.slow
def test_tokenize_then_quantize_from_the_command_line_reports_perplexity(folder):
    runner = CliRunner()
    for name, skip, count in (("model.calib.npz", 0, 8), ("model.eval.npz", 8, 4)):
        result = runner.invoke(main, ["tokenize", str(folder), str(folder / "text.txt"), str(folder / name),
                                      "--window", "24", "--windows", str(count), "--skip", str(skip)])
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, [str(folder / "model.onnx"), str(folder / "q.onnx"), "--bits", "4", "--no-speed",
                                  "--quiet"])
    assert result.exit_code == 0, result.output
    assert "perplexity on 92 next tokens of 4 windows" in result.output


@pytest.mark.slow
def test_the_speed_check_times_a_run_of_windows_whose_logits_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(perplexity, "LOGITS_BYTES", 2 * 12 * VOCAB * 4)  # two windows a run
    monkeypatch.setattr("onnx_qubo.evaluation.verify.SPEED_BUDGET", 0.0)
    ids = np.random.default_rng(3).integers(0, VOCAB, size=(6, 12))
    report = runs.quantize(lm_model()[0], tmp_path / "q.onnx", bits=4, calibration={"input_ids": ids},
                                batch_size=6)
    assert report.speed is not None and report.speed.batch_size == 2  # not the batch of 6: its logits may not fit


def _tokenize(folder: Path, *args: object, remove: str | None = None) -> list:
    make_folder(folder)
    if remove:
        (folder / remove).unlink()
    return ["tokenize", folder, folder / "text.txt", *args]


def _token_past_vocabulary(folder: Path) -> list:
    make_folder(folder)
    ids = np.ones((8, 12), np.int64)
    ids[5, 7] = VOCAB
    np.savez(folder / "model.calib.npz", input_ids=ids)
    return [folder / "model.onnx", folder / "out.onnx", "--solver", "rtn"]


BAD_INPUTS = [  # shown in docs/bad_inputs.md with those of tests/test_bad_inputs.py
    BadInput("`tokenize`: too little text for the windows",
             lambda d: _tokenize(d, d / "o.npz", "--window", "128", "--windows", "4", "--skip", "1"),
             "text file 'DIR/text.txt' holds 600 tokens; 4 window(s) of 128 tokens 128 apart after skipping 1 need "
             "640"),
    BadInput("`tokenize`: the output is the text", lambda d: _tokenize(d, d / "text.txt", "--window", "8",
                                                                       "--windows", "1"),
             "output 'DIR/text.txt' is the text file this run reads"),
    BadInput("`tokenize`: no tokenizer.json in the folder",
             lambda d: _tokenize(d, d / "o.npz", "--window", "8", "--windows", "1", remove="tokenizer.json"),
             "tokenizer 'DIR/tokenizer.json' does not exist"),
    BadInput("token id outside a language model's vocabulary", _token_past_vocabulary,
             f"input 'input_ids' holds token id {VOCAB}, outside the model's vocabulary of {VOCAB} (the last axis "
             "of output 'logits')"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.title for c in BAD_INPUTS])
def test_bad_text_input_is_refused_in_one_line_and_nothing_changes(case, tmp_path):
    assert_refused(case, tmp_path)
