"""Property-based fuzzing of ``onnx_qubo.quantize`` on random dense-layer chains and schemes.

Every case either succeeds or is refused with a one-line QuboInputError for a reason listed in
``fuzzing.LEGITIMATE_REFUSALS``, and at least MIN_ACCEPTED of the cases succeed (a library that
refused everything, each time for a listed reason, would otherwise pass). A success must pass
onnx's full check, run the same in onnxruntime at the default, basic and disabled optimization
levels, equal a numpy evaluation of the written file (integers and scales read back), keep its
integers on the grid and the output shapes of the float model, and leave no other file in the
output folder. A quarter of the cases run the chain in an If branch inside a Loop, taken on some
iterations only (``fuzzing.Case.in_loop``).

Short run (CI): ``CASES`` cases from a fixed seed. Long run:
``ONNX_QUBO_FUZZ_CASES=1000 ONNX_QUBO_FUZZ_SEED=12345 python -m pytest -q -s tests/test_fuzz.py``
(``-s`` prints the refusals counted by reason).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

import fuzzing
import numpy as np
import onnx
import pytest
import runs
from hypothesis import HealthCheck, given, seed, settings

from onnx_qubo import QuboInputError
from onnx_qubo.graph.runtime import BASIC, DEFAULT, NONE, make_session

CASES = int(os.environ.get("ONNX_QUBO_FUZZ_CASES", "40"))
SEED = int(os.environ.get("ONNX_QUBO_FUZZ_SEED", str(0x0A11CE)))
OUTCOMES: Counter = Counter()
MIN_ACCEPTED = 0.5  # share of cases that must be quantized: about 0.7 on runs of 150 (README)


@pytest.fixture(scope="module", autouse=True)
def print_outcomes():
    yield
    print(f"\nfuzz seed {SEED}, {CASES} cases: " + ", ".join(f"{k}: {v}" for k, v in OUTCOMES.most_common()))


@seed(SEED)
@settings(max_examples=CASES, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=fuzzing.cases())
def quantize_random_model(case: fuzzing.Case):
    """One generated case, its outcome counted in OUTCOMES."""
    model, feed = fuzzing.build(case)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        out = folder / "out.onnx"
        options = dict(case.options)
        try:
            report = runs.quantize(model, out, calibration=feed, **options)
        except QuboInputError as exc:
            message = str(exc)
            assert "\n" not in message, message
            reason = fuzzing.refusal_reason(message)
            assert reason is not None, f"unexpected refusal: {message}"
            OUTCOMES[f"refused ({reason})"] += 1
            assert fuzzing.leftovers(folder, set()) == []
            return
        assert fuzzing.leftovers(folder, {"out.onnx"}) == []
        written = onnx.load(out)
        onnx.checker.check_model(written, full_check=True)

        expected = make_session(model, NONE).run(None, feed)
        results = {level: make_session(written, level).run(None, feed) for level in (DEFAULT, BASIC, NONE)}
        oracle, ties, peak = fuzzing.evaluate(written, feed)
        tolerance = 2e-5 if not ties else 5e-2  # a rounding tie of an input may flip one grid step
        # DESIGN.md section 5: with quantized inputs, onnxruntime (basic level and up) rounds a float
        # Gemm bias to INT32 on its own, so those levels differ from the graph by that rounding
        rounded_bias = options["activations"] != "none" and fuzzing.float_gemm_bias(written)
        for k, reference in enumerate(oracle):
            assert results[NONE][k].shape == expected[k].shape == reference.shape
            scale = peak  # the largest tensor magnitude on the way: float32 noise grows with it
            np.testing.assert_allclose(results[NONE][k], reference, rtol=0, atol=tolerance * scale,
                                       err_msg="onnxruntime (optimizations disabled) vs numpy oracle")
            for level in (DEFAULT, BASIC):
                np.testing.assert_allclose(results[level][k], results[NONE][k], rtol=0,
                                           atol=(5e-2 if rounded_bias or ties else 2e-5) * scale,
                                           err_msg=f"level {level} vs optimizations disabled")
        assert fuzzing.integer_ranges_fit(written, {layer.bits for layer in report.layers}) == []
        OUTCOMES["quantized" + (" (in an If inside a Loop)" if case.in_loop else "")
                 + (" (activation rounding tie: loose oracle check)" if ties else "")
                 + (" (float Gemm bias with quantized inputs: loose level check)" if rounded_bias else "")] += 1


@pytest.mark.slow
def test_quantize_random_models():
    OUTCOMES.clear()
    quantize_random_model()
    total = sum(OUTCOMES.values())
    accepted = sum(count for outcome, count in OUTCOMES.items() if outcome.startswith("quantized"))
    assert total >= CASES and accepted >= MIN_ACCEPTED * total, OUTCOMES
