"""The GPU of this machine, for ``--target auto`` and for checking a real build's target.

Read with ``nvidia-smi`` where it answers (name, compute capability, memory), else with the CUDA
runtime through ctypes (compute capability and memory; the name as its architecture). Returns
None when there is no NVIDIA GPU: callers refuse in one line.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass

CUDA_ATTR_CC_MAJOR, CUDA_ATTR_CC_MINOR = 75, 76


@dataclass(frozen=True)
class LocalGPU:
    name: str
    compute_capability: tuple[int, int]
    memory_gib: float


def _from_nvidia_smi() -> LocalGPU | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap,memory.total", "--format=csv,noheader,nounits",
                              "--id=0"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    try:
        name, cc, mib = (x.strip() for x in out.stdout.splitlines()[0].split(","))
        major, minor = (int(x) for x in cc.split("."))
        return LocalGPU(name, (major, minor), float(mib) / 1024)
    except (IndexError, ValueError):
        return None  # Jetson's nvidia-smi reports no memory.total ("[N/A]"): ask CUDA


def _from_cudart() -> LocalGPU | None:
    for lib in ("libcudart.so", "libcudart.so.13", "libcudart.so.12"):
        try:
            cudart = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return None
    count = ctypes.c_int()
    if cudart.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value < 1:
        return None
    major, minor, free, total = ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t(), ctypes.c_size_t()
    if (cudart.cudaDeviceGetAttribute(ctypes.byref(major), CUDA_ATTR_CC_MAJOR, 0)
            or cudart.cudaDeviceGetAttribute(ctypes.byref(minor), CUDA_ATTR_CC_MINOR, 0)
            or cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))):
        return None
    return LocalGPU(f"GPU sm_{major.value}{minor.value}", (major.value, minor.value), total.value / (1 << 30))


def local_gpu() -> LocalGPU | None:
    return _from_nvidia_smi() or _from_cudart()
