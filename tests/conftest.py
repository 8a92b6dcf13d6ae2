"""Test-wide set-up: 8 fake CPU devices, set before JAX initialises its backend."""
import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow (TFDS) must never grab a GPU.
# As train.py: XLA's Triton GEMM fusion off, for suites run on a GPU (JAX_PLATFORMS=cuda), where
# XLA aborted compiling the train step with it (ddetr_jax/xla_gpu_flags.py).
from ddetr_jax import xla_gpu_flags  # noqa: E402  (imports no JAX)
xla_gpu_flags.disable_triton_gemm()

import signal  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _signal_handlers_left_as_found():
  """Every test leaves the SIGINT and SIGTERM handlers as it found them (the trainer installs its
  own for preemption and must restore them, even when the run fails). A test that changes one
  fails in teardown naming the handlers; they are put back first, so later tests are unaffected."""
  signums = (signal.SIGINT, signal.SIGTERM)
  before = {s: signal.getsignal(s) for s in signums}
  yield
  changed = {signal.Signals(s).name: (before[s], signal.getsignal(s)) for s in signums
             if signal.getsignal(s) is not before[s]}
  for s in signums:
    signal.signal(s, before[s])
  assert not changed, f"signal handlers changed by the test (before, after): {changed}"
