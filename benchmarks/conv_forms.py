# ruff: noqa: E501
"""Conv forms with 8-bit activations in onnxruntime 1.32 (CPU): which one is faster than float.

    python benchmarks/conv_forms.py            # every form on four Convs
    python benchmarks/conv_forms.py --sweep    # QLinearConv vs float by input channels per group

float Conv; the portable form (QuantizeLinear -> DequantizeLinear on the input, DequantizeLinear
on the int8 weight, float Conv); ConvInteger (uint8 x uint8, scalar weight zero point) -> Cast ->
Mul -> Add; QLinearConv written directly (output quantized: needs the Conv's output range, taken
here from the float output); and the QDQ pattern with a QuantizeLinear after the Conv, which
onnxruntime fuses into QLinearConv itself. One thread, median of repeated runs; each line gives
the latency ratio to float and the output difference to float relative to its largest value.
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper, numpy_helper


def conv_models(cin, cout, k, group, hw, batch, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(cout, cin // group, k, k)).astype(np.float32) * 0.1
    b = rng.normal(size=cout).astype(np.float32)
    x = np.abs(rng.normal(size=(batch, cin, hw, hw))).astype(np.float32)
    ws = np.abs(w).reshape(cout, -1).max(1) / 127
    wq = np.clip(np.rint(w / ws[:, None, None, None]), -127, 127).astype(np.int8)
    xs, xz = float(x.max() / 255), 0
    attrs = dict(kernel_shape=[k, k], pads=[k // 2] * 4, group=group)
    xin = helper.make_tensor_value_info("x", TP.FLOAT, [None, cin, hw, hw])
    yout = helper.make_tensor_value_info("y", TP.FLOAT, None)
    def model(nodes, inits):
        g = helper.make_graph(nodes, "g", [xin], [yout], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    C = numpy_helper.from_array
    common = [C(np.array(xs, np.float32), "xs"), C(np.array(xz, np.uint8), "xz")]
    models = {}
    models["float"] = model([helper.make_node("Conv", ["x", "W", "B"], ["y"], **attrs)], [C(w, "W"), C(b, "B")])
    models["qdq (portable)"] = model([
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["Wq", "ws"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "B"], ["y"], **attrs)], common + [C(wq, "Wq"), C(ws.astype(np.float32), "ws"), C(b, "B")])
    # ConvInteger: uint8 x uint8, scalar weight zero point 128
    models["ConvInteger"] = model([
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("ConvInteger", ["xq", "Wu", "xz", "wz"], ["acc"], **attrs),
        helper.make_node("Cast", ["acc"], ["accf"], to=TP.FLOAT),
        helper.make_node("Mul", ["accf", "sc"], ["m"]), helper.make_node("Add", ["m", "B4"], ["y"])],
        common + [C((wq.astype(np.int16) + 128).astype(np.uint8), "Wu"), C(np.array(128, np.uint8), "wz"),
                  C((xs * ws).astype(np.float32).reshape(1, -1, 1, 1), "sc"), C(b.reshape(1, -1, 1, 1), "B4")])
    # QLinearConv: needs an output scale (from the float output's range here)
    yf = ort.InferenceSession(models["float"].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    lo, hi = min(yf.min(), 0), max(yf.max(), 0)
    ys = float((hi - lo) / 255)
    yz = int(np.clip(np.round(-lo / ys), 0, 255))
    bq = np.rint(b / (xs * ws)).astype(np.int32)
    models["QLinearConv"] = model([
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("QLinearConv", ["xq", "xs", "xz", "Wq", "ws", "wz8", "ys", "yz", "Bq"], ["yq"], **attrs),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])],
        common + [C(wq, "Wq"), C(ws.astype(np.float32), "ws"), C(np.zeros(cout, np.int8), "wz8"),
                  C(np.array(ys, np.float32), "ys"), C(np.array(yz, np.uint8), "yz"), C(bq, "Bq")])
    models["qdq+output Q (ORT fuses)"] = model([
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["Wq", "ws", "wz8"], ["wd"], axis=0),
        helper.make_node("DequantizeLinear", ["Bq", "bs"], ["bd"], axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["yc"], **attrs),
        helper.make_node("QuantizeLinear", ["yc", "ys", "yz"], ["yq"]), helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])],
        common + [C(wq, "Wq"), C(ws.astype(np.float32), "ws"), C(np.zeros(cout, np.int8), "wz8"), C(bq, "Bq"),
                  C((xs * ws).astype(np.float32), "bs"), C(np.array(ys, np.float32), "ys"), C(np.array(yz, np.uint8), "yz")])
    return models, x

def time_model(m, x, reps):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = s.run(None, {"x": x})[0]
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        s.run(None, {"x": x})
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3, y


SWEEP = [(1, 16, 3, 1, 28, 64), (2, 16, 3, 1, 28, 64), (4, 16, 3, 1, 28, 64), (8, 16, 3, 1, 28, 64),
         (16, 16, 3, 1, 28, 64), (3, 16, 3, 1, 48, 16), (4, 32, 3, 1, 28, 64), (16, 4, 3, 1, 28, 64),
         (8, 16, 1, 1, 28, 64), (64, 64, 1, 1, 28, 16), (32, 32, 3, 32, 28, 16), (32, 64, 3, 16, 28, 16),
         (32, 64, 3, 8, 28, 16), (32, 32, 3, 4, 28, 16), (32, 32, 3, 2, 28, 16), (64, 64, 3, 4, 28, 16),
         (64, 64, 3, 2, 28, 16)]  # (cin, cout, k, group, hw, batch): where backends.ort_conv.qlinear_conv_slow draws its line


def sweep(reps: int = 15) -> None:
    for cin, cout, k, group, hw, batch in SWEEP:
        models, x = conv_models(cin, cout, k, group, hw, batch)
        base, fast = time_model(models["float"], x, reps)[0], time_model(models["QLinearConv"], x, reps)[0]
        print(f"{cin:3d}->{cout:3d} {k}x{k} group {group:2d} ({cin // group:2d} in, {cout // group:2d} out per group) "
              f"{hw}x{hw} b{batch}: float {base:6.2f} ms, QLinearConv {fast:6.2f} ms, x{fast / base:5.2f} float")


def main() -> None:
    if "--sweep" in sys.argv:
        sweep()
        return
    cases = [("mnist conv1 1->16 3x3 28x28 b256", (1, 16, 3, 1, 28, 256), 20),
             ("mnist conv2 16->32 3x3 g2 14x14 b256", (16, 32, 3, 2, 14, 256), 20),
             ("64->64 3x3 56x56 b8", (64, 64, 3, 1, 56, 8), 10),
             ("depthwise 64 3x3 56x56 b8", (64, 64, 3, 64, 56, 8), 10)]
    for label, args, reps in cases:
        models, x = conv_models(*args)
        base, yref = None, None
        print(label)
        for name, m in models.items():
            try:
                ms, y = time_model(m, x, reps)
            except Exception as e:  # noqa: BLE001 - a form onnxruntime refuses is a result
                print(f"  {name:28s} FAILED {str(e)[:150]}")
                continue
            if base is None:
                base, yref = ms, y
            print(f"  {name:28s} {ms:8.2f} ms  x{ms / base:5.2f} float   "
                  f"max|y-float|/max|float| {np.abs(y - yref).max() / np.abs(yref).max():.2e}")


if __name__ == "__main__":
    main()
