"""``python -m onnx_qubo``: the command line, as the ``onnx-qubo`` script."""

from .cli import main

main()
