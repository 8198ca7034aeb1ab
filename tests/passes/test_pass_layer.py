"""passes/ is a layer of its own: no module of it imports onnx_qubo, directly or by climbing out
of the package, so it type-checks and runs without the rest of the project."""

import ast
from pathlib import Path

PASSES = Path(__file__).resolve().parents[2] / "passes"


def test_no_pass_module_imports_onnx_qubo():
    offending = []
    for path in sorted(PASSES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level > 1 or (node.module or "").startswith("onnx_qubo")):
                offending.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.Import) and any(a.name.startswith("onnx_qubo") for a in node.names):
                offending.append(f"{path.name}:{node.lineno}")
    assert offending == []
    assert len(list(PASSES.glob("*.py"))) >= 8  # the folder was found
