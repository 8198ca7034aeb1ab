"""Evaluation: the float and the quantized model compared in onnxruntime."""
