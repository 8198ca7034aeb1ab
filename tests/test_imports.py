"""The modules of onnx_qubo import one another without a circle (tests/imports.py reads the
imports with ast: module level, inside functions and type-only ones alike)."""

from imports import cycles, edges, modules


def test_no_import_circle_inside_onnx_qubo():
    graph = edges(modules())
    assert len(graph) > 40 and "onnx_qubo.model.lowering" in graph["onnx_qubo.pipeline"]  # the package was read
    assert cycles(graph) == []


def test_circles_are_found_type_only_and_function_level_imports_included():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_edges_count_imports_made_inside_functions_and_under_type_checking(tmp_path):
    package = tmp_path / "onnx_qubo"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import X\n")
    (package / "b.py").write_text("def f():\n    from .sub import c\n")
    (package / "sub" / "c.py").write_text("from .. import a\n")
    graph = edges(modules(package), package)
    assert graph["onnx_qubo.a"] == {"onnx_qubo.b"} and graph["onnx_qubo.b"] == {"onnx_qubo.sub.c"}
    assert graph["onnx_qubo.sub.c"] == {"onnx_qubo.a"}
    assert cycles(graph) == [["onnx_qubo.a", "onnx_qubo.b", "onnx_qubo.sub.c"]]


LAYERS = [  # low to high: a module imports from its own layer and the ones below, never above
    ("onnx_qubo.core", "onnx_qubo.passes"),  # the shared vocabulary; the generic graph passes
    ("onnx_qubo.graph",),  # files, inputs, bodies, onnxruntime sessions
    ("onnx_qubo.rounding",),  # scales, QUBO, solvers, workers
    ("onnx_qubo.calibration",),  # data and input statistics
    ("onnx_qubo.backends",),  # how codes are written for a runtime, onnxruntime's rules
    ("onnx_qubo.forms",),  # the dense graph patterns
    ("onnx_qubo.model",),  # the model's layers found, split, written back
    ("onnx_qubo.evaluation",),  # float vs quantized in onnxruntime
    ("onnx_qubo",),  # the run's spine (api, cli, config, plan, layer, pipeline, autoscheme) and studies/
]


def layer_of(module: str) -> int:
    """The layer of the longest prefix ``module`` has among LAYERS'."""
    matches = [(len(prefix), k) for k, prefixes in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    return max(matches)[1]


def test_sub_packages_are_layers():
    """The folder tree is the architecture: no import climbs from a lower sub-package to a higher one."""
    graph = edges(modules())
    climbs = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))
    assert climbs == []
    assert {layer_of(module) for module in graph} == set(range(len(LAYERS)))  # every layer holds modules
