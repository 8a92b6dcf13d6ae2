"""XLA's GPU compiler options that the entry points set: Triton GEMM fusion off.

On an NVIDIA H200 with jax 0.11.2 and its CUDA 13 plugin (2026-12-04, session 25, the only GPU
this project has run on), XLA aborted the whole process while compiling the train step of both
configs/tiny.py and the full ResNet-50 config, before any step ran:

    triton_tiling_propagation.cc:703] Check failed: subdim_size_accumulator == dim_size (1024 vs. 64)

in its GemmFusion pass (which fuses a matmul with the reshapes and element-wise work around it
into one Triton-generated kernel). With `--xla_gpu_enable_triton_gemm=false` (matmuls through
cuBLAS, as torch runs them) both steps compiled and ran, at 0.20 (tiny) and 0.24 (full) of HF's
step time on the same GPU (benchmarks/RESULTS.md, "Train step on a GPU"). The Pallas sampler
kernel is Triton as well but is not a GEMM fusion, and compiles either way.

`disable_triton_gemm()` appends that flag to XLA_FLAGS unless XLA_FLAGS already sets
`--xla_gpu_enable_triton_gemm` (a user's own setting, either way, is kept; flags that only
share the prefix, such as `--xla_gpu_enable_triton_gemm_int4`, do not count). It must run before JAX
creates its first backend, which is when XLA reads XLA_FLAGS: `cli.run` (train.py, eval.py) and
the benchmarks that compile the model call it at start-up. CPU and TPU compilation ignore the
flag; the CPU build of jaxlib knows it too (an unknown XLA flag would be fatal). Library callers
that build and compile the train step themselves on a GPU call it first as well.
"""
import os
import re

FLAG_NAME = "xla_gpu_enable_triton_gemm"
FLAG = f"--{FLAG_NAME}=false"
_SET = re.compile(rf"(^|\s)--{FLAG_NAME}(=|\s|$)")


def disable_triton_gemm() -> bool:
  """Adds `--xla_gpu_enable_triton_gemm=false` to XLA_FLAGS; returns whether it did."""
  xla_flags = os.environ.get("XLA_FLAGS", "")
  if _SET.search(xla_flags):
    return False
  os.environ["XLA_FLAGS"] = f"{xla_flags} {FLAG}".strip()
  return True
