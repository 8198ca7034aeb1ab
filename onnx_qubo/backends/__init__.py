"""The backends: how a layer's integer codes are written for a runtime, and every onnxruntime rule.

- ``portable.py``: the standard ONNX form (integers -> ``DequantizeLinear``), and what
  onnxruntime's optimizer gets wrong on it;
- ``ort.py``, ``ort_conv.py``: onnxruntime's own kernels (``MatMulNBits``, ``MatMulIntegerToFloat``,
  ``GatherBlockQuantized``, ``QLinearConv``) built from the codes, each with its numpy meaning and
  the shapes it refuses;
- ``kernels.py``: the output format and the per-layer kernel choice.
"""
