"""Peak memory of a block of code, everything counted, on CUDA and on CPU alike.

    with chunklogits.memory.peak() as m:
        loss = f(x); loss.backward()
    print(m.bytes)          # peak bytes above the level at entry

CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) minus the allocated
bytes at entry. Every tensor counts, autograd's saved tensors and op workspaces included; memory
the allocator reserves but has not handed out does not.

CPU (Linux): the process's peak resident set. At entry the kernel's high-water mark is reset
through ``/proc/self/clear_refs`` and the resident set is read; at exit the high-water mark
(``VmHWM``) minus that entry level is the peak. So every page the process touches counts — tensors,
op workspaces (oneDNN, MKL), autograd buffers, the interpreter — which is the point. Limits:

* Freed memory must leave the resident set, or a freed tensor's pages would hide a later
  allocation. glibc hands large blocks back on ``free`` only when they were ``mmap``-ed, and its
  threshold for that grows with use. The first ``peak()`` on CPU therefore pins the threshold
  (``mallopt(M_MMAP_THRESHOLD, 256 KiB)``, and the trim threshold likewise) for the rest of the
  process: allocations above 256 KiB then come fresh from the kernel, which costs a little time
  in page faults. Measure time and memory in separate runs.
* Memory allocated but never touched (``torch.empty`` not written) is not resident, so it does
  not count; the naive baselines write what they allocate, so this does not flatter anyone.
* Other threads of the process count too, and pages can be read back from swap or shared
  libraries loaded lazily by the measured code (the first call of an op): warm up first.
* The resolution is a page (4 KiB); numbers below ~1 MiB are noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_PINNED_BYTES = 256 * 1024
_libc_state: dict[str, object] = {}


@dataclass
class Peak:
    """Result of ``peak()``: ``bytes`` above the entry level, set when the block exits."""

    bytes: int = 0
    device: str = "cpu"
    # The highest mark seen before a nested measurement reset it.
    _reached: int = field(default=0, repr=False)

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


def pin_allocator() -> None:
    """Pin glibc's mmap and trim thresholds (see the module doc) now rather than at the first
    ``peak()``, e.g. before timing several implementations that are also measured."""
    _libc()


def _libc():
    if "lib" not in _libc_state:
        name = ctypes.util.find_library("c")
        lib = ctypes.CDLL(name) if name else None
        if lib is not None and hasattr(lib, "mallopt"):
            lib.mallopt(_M_MMAP_THRESHOLD, _PINNED_BYTES)
            lib.mallopt(_M_TRIM_THRESHOLD, _PINNED_BYTES)
        _libc_state["lib"] = lib
    return _libc_state["lib"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _reset_cpu_high_water_mark() -> int:
    lib = _libc()
    gc.collect()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError as error:
        raise RuntimeError(
            "chunklogits.memory.peak() on CPU needs Linux's /proc/self/clear_refs to reset the "
            f"peak resident set ({error}); use a CUDA device or Linux"
        ) from error
    return _status_kib("VmRSS")


# The measurements in progress, outermost first: a nested ``peak()`` resets the high-water mark
# its enclosing ones read, so it first hands them the mark reached so far.
_open: list[Peak] = []


def _high_water_mark(device: torch.device) -> int:
    """Bytes: the CUDA allocator's peak, or the CPU resident set's (VmHWM)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


@contextmanager
def peak(device: torch.device | str | None = None):
    """Measure the peak memory of the ``with`` block above its entry level (see module doc).
    Measurements nest: each gives the peak of its own block.

    device: ``"cuda"``/``"cuda:N"`` for the CUDA allocator, ``"cpu"`` for the process's resident
    set; None means the current CUDA device when CUDA is available, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    result = Peak(device=str(device))
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device: expected a cpu or cuda device, got {device}")
    if device.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        raise RuntimeError("chunklogits.memory.peak() on CPU needs Linux (/proc/self/clear_refs)")
    enclosing = [m for m in _open if m.device == result.device]
    if enclosing:
        reached = _high_water_mark(device)
        for outer in enclosing:
            outer._reached = max(outer._reached, reached)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _reset_cpu_high_water_mark() * 1024
    _open.append(result)
    try:
        yield result
    finally:
        _open.remove(result)
        reached = max(result._reached, _high_water_mark(device))
        result.bytes = max(0, reached - base)
