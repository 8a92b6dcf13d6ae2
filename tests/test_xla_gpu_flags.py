"""xla_gpu_flags: the entry points turn XLA's Triton GEMM fusion off, keeping a user's setting."""
import os
import subprocess
import sys

import pytest

from ddetr_jax import xla_gpu_flags

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("before,after,changed", [
    (None, "--xla_gpu_enable_triton_gemm=false", True),
    ("", "--xla_gpu_enable_triton_gemm=false", True),
    ("--xla_force_host_platform_device_count=8",
     "--xla_force_host_platform_device_count=8 --xla_gpu_enable_triton_gemm=false", True),
    # The user's own setting, either way, stays as it is.
    ("--xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_triton_gemm=true", False),
    ("--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=false",
     "--xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=false", False),
    ("--xla_gpu_enable_triton_gemm", "--xla_gpu_enable_triton_gemm", False),  # bare: true
    # Another flag that only shares the name's prefix leaves the fusion on: still appended.
    ("--xla_gpu_enable_triton_gemm_int4=true",
     "--xla_gpu_enable_triton_gemm_int4=true --xla_gpu_enable_triton_gemm=false", True),
])
def test_appends_the_flag_unless_xla_flags_names_it(monkeypatch, before, after, changed):
  if before is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", before)
  assert xla_gpu_flags.disable_triton_gemm() is changed
  assert os.environ["XLA_FLAGS"] == after
  assert xla_gpu_flags.disable_triton_gemm() is False  # a second call adds nothing
  assert os.environ["XLA_FLAGS"] == after


def test_this_jaxlib_accepts_the_flag_and_computes_with_it():
  # XLA reads XLA_FLAGS when JAX creates its first backend and exits on a flag it does not know:
  # the CPU build must know the GPU flag, or every CPU run of train.py would die at start-up.
  probe = ("from ddetr_jax import xla_gpu_flags\n"
           "import os, jax, jax.numpy as jnp\n"
           "assert xla_gpu_flags.disable_triton_gemm()\n"
           "print(os.environ['XLA_FLAGS'], float(jax.jit(lambda x: x @ x)(jnp.eye(3)).sum()))\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", probe], cwd=_ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["--xla_gpu_enable_triton_gemm=false", "3.0"]


def test_an_unknown_xla_flag_is_fatal_so_the_probe_above_can_fail():
  probe = "import jax; jax.devices()"
  env = dict(os.environ, XLA_FLAGS="--xla_gpu_enable_triton_gemm_misspelt=false")
  out = subprocess.run([sys.executable, "-c", probe], cwd=_ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=False)
  assert out.returncode != 0
  assert "xla_gpu_enable_triton_gemm_misspelt" in out.stderr
