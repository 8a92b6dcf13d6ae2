"""glibc malloc settings that keep XLA:CPU's large temporary buffers mapped between calls.

XLA:CPU allocates an executable's temporaries with the C allocator on every call. glibc serves a
block above `M_MMAP_THRESHOLD` (128 KiB, growing dynamically to at most 32 MiB) with a fresh
`mmap` and returns it with `munmap` when freed, so each call takes one page fault per 4 KiB page
of every large buffer, and the kernel zero-fills each page: for the sampler's value gradient at
an 800x1066 image (18 MB) that is most of the decoder's backward time. Raising the mmap threshold
serves those blocks from the heap instead, and raising `M_TRIM_THRESHOLD` keeps freed heap memory
mapped for the next call.

Measured on this project's 2-core CI machine (`benchmarks/msda.py`, decoder Q=300, batch 1,
forward+backward): 20 ms -> 10 ms. The cost: memory freed by XLA stays in the process (resident
size stays near its peak) rather than going back to the OS, which is what a training process
wants anyway.

Those two settings govern glibc's main arena only, and XLA:CPU allocates from its own worker
threads, which glibc gives arenas of their own: heaps of at most 64 MiB, each unmapped as soon
as it is entirely free, and blocks over 64 MiB mapped one by one. So the train step of the shapes
demo still took about 42,000 page faults a step (about 80 ms of kernel time in a 160-180 ms
step) with the thresholds raised. `M_ARENA_MAX` = 1 makes every thread allocate from the main
arena, where the thresholds hold: 0 page faults a step, and the sampler's decoder
forward+backward at batch 2 (`benchmarks/msda.py`) went from 53-62 ms to 18.5-19 ms (README,
"The sampler"). The price is one lock for all threads: the demo's train loop ran at the same
speed within noise (43.7-44.6 against 39.5-43.1 images/s over 500 steps, two runs each), but
the tiny config's train step (`benchmarks/train_step.py`) took 0.26-0.33 s against 0.22-0.26 s
and compiled in 30-36 s against 20-23 s. So it is opt-in: set the environment variable
`DDETR_JAX_MALLOC_ARENA_MAX=1` (any N > 0 caps glibc at N arenas); unset, glibc keeps its own.

`tune()` applies the settings through `mallopt` on Linux with glibc and does nothing elsewhere.
The entry points (`train.py`, `eval.py`, the benchmarks) call it at start-up; set the
environment variable `DDETR_JAX_KEEP_MALLOC=1` to leave the allocator alone.

Transparent huge pages. Where the kernel offers them on request (THP mode `madvise` or
`always`), glibc 2.35+ advises them for the memory it maps when started with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`; a tunable is read only at process start, so
`reexec_with_huge_pages()` restarts the program (same interpreter, same command line, same PID)
with it set. Large XLA buffers then fault in 2 MiB at a time instead of 4 KiB and need far
fewer TLB entries. Measured on the 2-core CI machine (train step, median of 8-30 steps, with and
without, alternating; 2026-12-03): the shapes demo's 0.126-0.128 s -> 0.114-0.117 s, the tiny
config's 0.136-0.143 s -> 0.125-0.130 s, the full ResNet-50 config at 256 px 1.00 s ->
0.91-0.94 s on most steps but 1.35-1.6 s on every third (a fresh mapping of a >64 MiB
temporary each step; with `DDETR_JAX_MALLOC_ARENA_MAX=1` as well the full step is a steady
0.935-0.957 s), and in `benchmarks/train_step.py` (JAX and torch in one process, 8 steps)
huge pages made both frameworks slower on the full config (JAX 1.003 -> 1.074 s, HF 1.413 ->
1.499 s) and left tiny unchanged; the whole shapes demo (`make demo`, 3366 steps) trained in
7 min 59 s with it against 8 min 1 s without. So it is opt-in: with `DDETR_JAX_HUGE_PAGES=1`,
`train.py`, `eval.py` and `benchmarks/train_step.py` restart themselves this way first thing.
`DDETR_JAX_KEEP_MALLOC=1` overrides it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import re
import sys
from typing import Optional, Sequence

_LOG = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

MMAP_THRESHOLD = 1 << 30   # blocks up to 1 GiB come from the heap, not from mmap.
TRIM_THRESHOLD = 1 << 31   # keep up to 2 GiB of freed memory at the top of the heap mapped.
TOP_PAD = 64 << 20         # grow the heap 64 MiB at a time.
ARENA_ENV = "DDETR_JAX_MALLOC_ARENA_MAX"  # opt-in cap on glibc's arenas (1: main arena only).
HUGE_PAGES_ENV = "DDETR_JAX_HUGE_PAGES"   # "1": restart with glibc.malloc.hugetlb=1 (opt-in).
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _kept_by_user() -> bool:
  """DDETR_JAX_KEEP_MALLOC is set (to anything but 0): leave the allocator alone."""
  return os.environ.get("DDETR_JAX_KEEP_MALLOC", "") not in ("", "0")


def tune() -> bool:
  """Applies the settings above; returns True when glibc accepted all of them.

  With DDETR_JAX_MALLOC_ARENA_MAX=N (N > 0) it also caps glibc at N arenas; call it before JAX
  or torch start their threads then: an arena a thread already has stays its own.

  Raises:
    ValueError: DDETR_JAX_MALLOC_ARENA_MAX is set but not a positive integer.
  """
  if _kept_by_user():
    return False
  settings = [(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
              (_M_TOP_PAD, TOP_PAD)]
  arenas = os.environ.get(ARENA_ENV, "").strip()
  if arenas:
    if not arenas.isdigit() or int(arenas) < 1:
      raise ValueError(f"{ARENA_ENV} must be a positive integer (1: every thread allocates from "
                       f"the main arena), got {arenas!r}")
    settings.append((_M_ARENA_MAX, int(arenas)))
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  ok = all(mallopt(param, value) == 1 for param, value in settings)
  if not ok:
    _LOG.info("glibc mallopt refused a setting; large XLA buffers may be mmap'd per call")
  return ok


def _thp_mode(path: str = _THP_MODE_FILE) -> Optional[str]:
  """The kernel's transparent huge page mode ('always', 'madvise' or 'never'), None if unknown."""
  try:
    with open(path) as f:
      match = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def huge_pages_available() -> bool:
  """Linux with glibc >= 2.35 (the `glibc.malloc.hugetlb` tunable) and THP offered on request."""
  if platform.system() != "Linux":
    return False
  libc, version = platform.libc_ver()
  try:
    major, minor = (int(v) for v in version.split(".")[:2])
  except ValueError:
    return False
  if libc != "glibc" or (major, minor) < (2, 35):
    return False
  return _thp_mode() in ("always", "madvise")


def huge_pages_wanted() -> bool:
  """Whether `reexec_with_huge_pages` would restart this process: DDETR_JAX_HUGE_PAGES=1, no
  DDETR_JAX_KEEP_MALLOC, the tunable not already set, and `huge_pages_available()`."""
  if _kept_by_user():
    return False
  if os.environ.get(HUGE_PAGES_ENV, "") != "1":
    return False
  if "glibc.malloc.hugetlb" in os.environ.get("GLIBC_TUNABLES", ""):
    return False
  return huge_pages_available()


def reexec_with_huge_pages(argv: Optional[Sequence[str]] = None) -> None:
  """Restarts the program with GLIBC_TUNABLES += glibc.malloc.hugetlb=1 when `huge_pages_wanted()`.

  Call it first thing in a program's main, before threads or files are opened: `os.execv`
  replaces the process (same PID, same open stdio), so nothing after the call runs in the old
  image. argv defaults to `sys.orig_argv` (the interpreter's full command line). Returns without
  doing anything when not wanted.
  """
  if not huge_pages_wanted():
    return
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  os.environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGES_TUNABLE}" if tunables else HUGE_PAGES_TUNABLE
  sys.stdout.flush()
  sys.stderr.flush()
  argv = list(argv if argv is not None else sys.orig_argv)
  os.execv(sys.executable, argv)
