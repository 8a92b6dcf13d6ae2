"""host_malloc.tune(): large blocks come from glibc's heap instead of a fresh mmap each time."""
import os
import platform
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GLIBC_ONLY = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc settings apply on Linux with glibc only")

# Allocates and frees a 64 MiB block twice, on the main thread or (argv[2] == "thread") on two
# worker threads one after the other, as XLA:CPU allocates, and prints tune()'s result and how
# many bytes glibc held in mmap'd blocks while the block was alive (mallinfo2().hblkhd).
_PROBE = r"""
import ctypes, sys, threading
sys.path.insert(0, sys.argv[1])
from ddetr_jax import host_malloc
tuned = host_malloc.tune()
class MallInfo2(ctypes.Structure):
  _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
              "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.mallinfo2.restype = MallInfo2
held = []
def work():
  for _ in range(2):
    block = libc.malloc(64 << 20)
    ctypes.memset(block, 1, 64 << 20)
    held.append(libc.mallinfo2().hblkhd)
    libc.free(block)
if sys.argv[2] == "thread":
  for _ in range(2):
    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
else:
  work()
print(tuned, max(held))
"""


def _probe(env_extra, where="main"):
  env = dict(os.environ, **env_extra)
  out = subprocess.run([sys.executable, "-c", _PROBE, REPO, where], env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  return out[0] == "True", int(out[1])


@_GLIBC_ONLY
def test_tune_serves_large_blocks_from_the_heap():
  tuned, mmapped = _probe({"DDETR_JAX_KEEP_MALLOC": ""})
  assert tuned
  assert mmapped < (64 << 20)  # the 64 MiB block did not get its own mapping.
  # Control: with the opt-out, glibc's default maps such a block by itself.
  tuned, mmapped = _probe({"DDETR_JAX_KEEP_MALLOC": "1"})
  assert not tuned
  assert mmapped >= (64 << 20)


# XLA:CPU allocates on its worker threads; glibc gives each its own arena (heaps of at most 64
# MiB, whatever the main arena's thresholds) unless M_ARENA_MAX keeps them in the main one,
# which DDETR_JAX_MALLOC_ARENA_MAX=1 opts into.
@_GLIBC_ONLY
def test_one_arena_serves_worker_thread_blocks_from_the_heap():
  tuned, mmapped = _probe({"DDETR_JAX_KEEP_MALLOC": "", "DDETR_JAX_MALLOC_ARENA_MAX": "1"},
                          "thread")
  assert tuned
  assert mmapped < (64 << 20)
  # Without the cap (the default), a worker thread's arena maps the block by itself.
  tuned, mmapped = _probe({"DDETR_JAX_KEEP_MALLOC": "", "DDETR_JAX_MALLOC_ARENA_MAX": ""},
                          "thread")
  assert tuned
  assert mmapped >= (64 << 20)


def test_bad_arena_cap_is_an_error_naming_the_variable(monkeypatch):
  from ddetr_jax import host_malloc  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("DDETR_JAX_KEEP_MALLOC", "")
  monkeypatch.setenv("DDETR_JAX_MALLOC_ARENA_MAX", "zero")
  with pytest.raises(ValueError, match="DDETR_JAX_MALLOC_ARENA_MAX.*'zero'"):
    host_malloc.tune()


# Restarts itself through reexec_with_huge_pages, then writes a 64 MiB malloc'd block and prints the GLIBC_TUNABLES it runs with, its PID before and after the restart, and the
# kB of anonymous huge pages mapped (/proc/self/smaps_rollup).
_HUGE_PAGE_PROBE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
first_pid = os.environ.setdefault("PROBE_FIRST_PID", str(os.getpid()))
from ddetr_jax import host_malloc
host_malloc.reexec_with_huge_pages()
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
block = libc.malloc(64 << 20)  # 64 MiB from glibc, as XLA allocates (numpy advises on its own)
ctypes.memset(block, 1, 64 << 20)
huge = 0
for line in open("/proc/self/smaps_rollup"):
  if line.startswith("AnonHugePages:"):
    huge = int(line.split()[1])
print(os.environ.get("GLIBC_TUNABLES", "-"), first_pid, os.getpid(), huge)
"""


def _huge_page_probe(env_extra):
  env = dict(os.environ, **env_extra)
  env.pop("GLIBC_TUNABLES", None)
  env.pop("PROBE_FIRST_PID", None)
  out = subprocess.run([sys.executable, "-c", _HUGE_PAGE_PROBE, REPO], env=env,
                       capture_output=True, text=True, check=True).stdout.split()
  return out[0], out[1] == out[2], int(out[3])


def test_reexec_with_huge_pages_restarts_once_with_the_tunable():
  from ddetr_jax import host_malloc  # pylint: disable=g-import-not-at-top
  if not host_malloc.huge_pages_available():
    pytest.skip("this machine offers no transparent huge pages on request (or glibc < 2.35)")
  tunables, same_pid, huge_kb = _huge_page_probe({"DDETR_JAX_KEEP_MALLOC": "",
                                                  "DDETR_JAX_HUGE_PAGES": "1"})
  assert tunables == host_malloc.HUGE_PAGES_TUNABLE
  assert same_pid  # os.execv: the same process, restarted once
  assert huge_kb >= 2048  # the block got at least one 2 MiB page
  # Not opted in (the default): no restart, no tunable, and (where the kernel gives huge pages
  # only on request, THP 'madvise') no huge pages for the block; with THP 'always' the kernel
  # backs large blocks with huge pages whatever glibc asks.
  tunables, same_pid, huge_kb = _huge_page_probe({"DDETR_JAX_HUGE_PAGES": ""})
  assert tunables == "-" and same_pid
  if host_malloc._thp_mode() == "madvise":  # pylint: disable=protected-access
    assert huge_kb == 0


def test_huge_pages_are_not_wanted_unless_opted_in_and_not_yet_set(monkeypatch):
  from ddetr_jax import host_malloc  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("DDETR_JAX_KEEP_MALLOC", "")
  for value in ("", "0", "yes"):
    monkeypatch.setenv("DDETR_JAX_HUGE_PAGES", value)
    assert not host_malloc.huge_pages_wanted()
  monkeypatch.setenv("DDETR_JAX_HUGE_PAGES", "1")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  assert not host_malloc.huge_pages_wanted()
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setenv("DDETR_JAX_KEEP_MALLOC", "1")
  assert not host_malloc.huge_pages_wanted()


def test_thp_mode_is_read_from_the_bracketed_word(tmp_path):
  from ddetr_jax import host_malloc  # pylint: disable=g-import-not-at-top
  mode = tmp_path / "enabled"
  mode.write_text("always [madvise] never\n")
  assert host_malloc._thp_mode(str(mode)) == "madvise"
  mode.write_text("always madvise [never]\n")
  assert host_malloc._thp_mode(str(mode)) == "never"
  assert host_malloc._thp_mode(str(tmp_path / "missing")) is None
