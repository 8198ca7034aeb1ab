"""The ONNX model as files, inputs and graph bodies, and onnxruntime sessions on it."""
