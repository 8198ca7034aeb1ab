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
