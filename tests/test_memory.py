"""A run hands the memory a stage freed back to the system before the next stage (glibc keeps
freed arrays of up to 32 MB in its heap otherwise, and the peaks of the stages add up)."""

import ctypes.util
import subprocess
import sys

import pytest

SCRIPT = """
import numpy as np
from onnx_qubo.calibration.memory import return_freed_memory

def rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) // 1024

warm = np.ones(1 << 19)  # 4 MB, mmapped; freeing it raises glibc's mmap threshold above 4 MB
del warm
arrays, pins = [], []
for _ in range(100):  # 400 MB in the heap, each array below a small one that stays: the heap cannot shrink
    arrays.append(np.ones(1 << 19))
    pins.append(np.ones(1 << 12))
del arrays
freed = rss()
return_freed_memory()
print(freed, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc's malloc_trim: Linux only")
def test_freed_arrays_go_back_to_the_system():
    freed, returned = map(int, subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                                              check=True).stdout.split())
    assert freed - returned > 300  # MB


def test_more_levels_are_planned_as_a_larger_solve():
    """``--levels L`` repeats a layer's inputs L - 1 times in its QUBO: the memory plan counts it,
    so a budget that fits the binary solve beside the statistics is too small for four levels."""
    from onnx_qubo.calibration import memory
    from onnx_qubo.core.errors import OptionError
    from onnx_qubo.pipeline import find_layers

    from graphs import mlp_model

    layers, _ = find_layers(mlp_model(widths=(64, 128, 16)))
    binary, four = (max(memory.solve_bytes(layer, levels) for layer in layers) for levels in (2, 4))
    assert 9 * binary > four > 3 * binary
    statistics = sum(memory.statistics_bytes(layer, drift=False) for layer in layers)
    budget = binary + statistics
    assert len(memory.calibration_groups(layers, budget, 0, drift=False)) == 1
    with pytest.raises(OptionError, match="too small"):
        memory.calibration_groups(layers, budget, 0, drift=False, levels=4)
