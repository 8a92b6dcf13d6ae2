"""Multi-scale deformable attention as a C++ kernel for XLA:CPU (an XLA FFI custom call).

`ms_deform_attn_cpu(value, spatial_shapes, sampling_locations, attention_weights)` is the same
function as `ms_deform_attn(..., impl="xla")` with the same shapes: value (B, S, M, D),
sampling_locations (B, Q, M, L, P, 2), attention_weights (B, Q, M, L, P) -> (B, Q, M * D).

Why a kernel on the CPU: XLA:CPU emits the gather-based sampler as loops that materialize the
gathered (B, q, M, P, D) blocks chunk by chunk, and its backward's value gradient is a
scatter-add that XLA:CPU runs one row at a time with index bookkeeping per element. The kernel
(`ms_deform_attn_cpu.cc`) walks every sampling point once, reads its four corner rows and
accumulates straight into the output row (forward) or into the value-gradient rows (backward),
with no intermediate blocks. The work is split by (batch element, head): one unit owns all the
value-gradient rows of its head, so the scatter needs no atomics, and the units run on XLA's
intra-op thread pool.

Backward (`jax.custom_vjp`): saves only the three inputs (as impl="xla" does) and computes all
three gradients in one kernel call that reads each corner row once for the dot product with
the output gradient and adds into the same row of the value gradient.

Build: the first call compiles the kernel with the C++ compiler (`$CXX`, default `c++`) against
the XLA FFI headers that ship with jaxlib (`jax.ffi.include_dir()`), about 3 s, into
`$DDETR_JAX_KERNEL_CACHE` (default `~/.cache/ddetr_jax/kernels`). The file name holds a hash of
the source, jaxlib's version, the compiler, the flags and the host CPU's feature flags
(`-march=native`), so a changed source, jaxlib or machine gets a fresh build; the write is
atomic (temp file + rename), so concurrent first calls are safe. A cached library is loaded
only if it and its directory belong to this user and are not writable by others. When no
compiler is found or the build fails (or takes over `BUILD_TIMEOUT_S`),
`kernel_unavailable_reason()` says why and impl="auto" uses "xla"; the failure is remembered
for the process, so it is not retried on every trace.

Non-finite input: a NaN sampling location makes its (b, q, m) output row and that point's
location and attention-weight gradients NaN, as in impl="xla" (which also writes NaN into one
value-gradient row; the kernel leaves the value gradient alone). Infinite locations are far
outside the map and read zeros.

Dtypes: float32 and float64 run natively; bfloat16/float16 inputs are computed in float32 and
the output is cast back to value's dtype (as impl="xla"). Gradients come back in each input's
dtype.

Batching and sharding: the custom call is partitioned along batch (`custom_partitioning`, with
a Shardy rule that lets only the batch factor be sharded): a batch-sharded call runs the kernel
on each device's shard, with no gather of other devices' values, like impl="xla". vmap folds
the mapped axis into the batch (`custom_vmap`); a forward vmapped over query sets with the
value map shared folds it into the queries instead, so the value map is not copied per set.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from ddetr_jax.ops.ms_deform_attn import _compute_dtype

_SOURCE = Path(__file__).with_name("ms_deform_attn_cpu.cc")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_FORWARD_TARGET = "ddetr_msda_cpu_forward"
_BACKWARD_TARGET = "ddetr_msda_cpu_backward"


def kernel_cache_dir() -> Path:
  """Where built kernels live: $DDETR_JAX_KERNEL_CACHE, else ~/.cache/ddetr_jax/kernels."""
  env = os.environ.get("DDETR_JAX_KERNEL_CACHE")
  if env:
    return Path(env)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return Path(base) / "ddetr_jax" / "kernels"


def _cpu_flags() -> str:
  """The host CPU's feature flags (part of the build key, since the build uses -march=native)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _compiler() -> list[str] | None:
  """$CXX (a command, possibly with arguments, e.g. "ccache g++") or "c++", resolved; None if
  it is not found."""
  words = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
  found = shutil.which(words[0])
  return [found, *words[1:]] if found else None


def _library_path(compiler: list[str]) -> Path:
  import jaxlib  # pylint: disable=import-outside-toplevel
  key = hashlib.sha256()
  for part in (_SOURCE.read_bytes(), jaxlib.__version__.encode(), " ".join(compiler).encode(),
               " ".join(_FLAGS).encode(), _cpu_flags().encode()):
    key.update(part)
    key.update(b"\0")
  return kernel_cache_dir() / f"ms_deform_attn_cpu-{key.hexdigest()[:16]}.so"


def _check_trusted(path: Path) -> None:
  """Refuses to load a library that another user could have written: the file and its
  directory must belong to this user and not be writable by group or others."""
  if not hasattr(os, "getuid"):
    return
  for p in (path, path.parent):
    st = p.stat()
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
      raise RuntimeError(
          f"refusing to load {path}: {p} is not owned by this user or is writable by others "
          f"(set DDETR_JAX_KERNEL_CACHE to a private directory)")


# Seconds a kernel build may take before it counts as failed.
BUILD_TIMEOUT_S = 300


def build() -> Path:
  """Compiles the kernel if no build for this source/jaxlib/compiler/CPU exists; returns the path.

  Raises RuntimeError naming the compiler and its output when the build fails or times out,
  and when the cache holds a library another user could have written.
  """
  compiler = _compiler()
  if compiler is None:
    raise RuntimeError(f"no C++ compiler found (looked for $CXX or 'c++': "
                       f"{os.environ.get('CXX', 'c++')!r})")
  path = _library_path(compiler)
  if path.exists():
    _check_trusted(path)
    return path
  path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=path.parent)
  os.close(fd)
  cmd = [*compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(_SOURCE), "-o", tmp]
  try:
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                            timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"building {_SOURCE.name} took over {BUILD_TIMEOUT_S} s "
                         f"({' '.join(cmd)})") from e
    if proc.returncode != 0:
      raise RuntimeError(f"building {_SOURCE.name} failed ({' '.join(cmd)}):\n"
                         f"{proc.stderr[-4000:]}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  _check_trusted(path)
  return path


_REGISTER_LOCK = threading.Lock()
_REGISTERED: list = []  # [None] once registered, [exception] once that failed


def _register() -> None:
  """Builds (if needed), loads and registers the two FFI targets, once per process. A failure
  is remembered and raised again, so a broken build is not retried on every trace."""
  with _REGISTER_LOCK:
    if not _REGISTERED:
      try:
        lib = ctypes.cdll.LoadLibrary(str(build()))
        jax.ffi.register_ffi_target(_FORWARD_TARGET, jax.ffi.pycapsule(lib.DdetrMsdaForward),
                                    platform="cpu")
        jax.ffi.register_ffi_target(_BACKWARD_TARGET, jax.ffi.pycapsule(lib.DdetrMsdaBackward),
                                    platform="cpu")
        _REGISTERED.append(None)
      except Exception as e:  # noqa: BLE001 - kept and re-raised below.
        _REGISTERED.append(e)
    if _REGISTERED[0] is not None:
      raise RuntimeError(f"the ms_deform_attn C++ kernel is unavailable: {_REGISTERED[0]}") \
          from _REGISTERED[0]


def kernel_unavailable_reason() -> str | None:
  """None when the kernel builds and registers here, else why not (never raises)."""
  try:
    _register()
  except Exception as e:  # noqa: BLE001 - any failure is a reason to fall back.
    return f"{type(e).__name__}: {e}"
  return None


def _shapes_attr(spatial_shapes) -> np.ndarray:
  return np.asarray(spatial_shapes, np.int64).reshape(-1)


def _forward_call(spatial_shapes, value, loc, attn):
  """value (B, S, M, D), loc (B, Q, M, L, P, 2), attn (B, Q, M, L, P) -> (B, Q, M, D)."""
  out = jax.ShapeDtypeStruct((*loc.shape[:-3], value.shape[-1]), value.dtype)
  return jax.ffi.ffi_call(_FORWARD_TARGET, out)(value, loc, attn,
                                                shapes=_shapes_attr(spatial_shapes))


def _backward_call(spatial_shapes, value, loc, attn, g):
  """... and g (B, Q, M, D) -> (grad value, grad loc, grad attn), shaped as the inputs."""
  outs = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (value, loc, attn))
  return jax.ffi.ffi_call(_BACKWARD_TARGET, outs)(value, loc, attn, g,
                                                  shapes=_shapes_attr(spatial_shapes))


# Einsum-like sharding rules (Shardy) of the two calls: only the batch factor b may be sharded.
_FORWARD_RULE = "b s m d, b q m l p c, b q m l p -> b q m d"
_BACKWARD_RULE = ("b s m d, b q m l p c, b q m l p, b q m d -> "
                  "b s m d, b q m l p c, b q m l p")
_REPLICATED_FACTORS = ("s", "m", "d", "q", "l", "p", "c")


def _batch_sharding(mesh, arg_shapes) -> NamedSharding:
  """The batch axis' sharding of the first operand split along its batch (value, then the
  query-shaped ones), else replicated: every operand is then split the same way, locally (a
  slice of a replicated operand needs no communication), rather than all-gathered."""
  for shape in arg_shapes:
    spec = getattr(shape.sharding, "spec", None)
    if spec and spec[0] is not None:
      return NamedSharding(mesh, P(spec[0]))
  return NamedSharding(mesh, P())


def _partitioned(call, num_outputs: int, rule: str, queries_foldable: bool = False):
  """`call` (local arrays -> local arrays) as a batch-partitioned op: each device runs the
  kernel on its own batch shard (custom_partitioning), then vmap folds into the batch
  (custom_vmap), since custom_partitioning has no batching rule of its own. With
  `queries_foldable` (the forward: every output is query-shaped), a vmap that leaves value
  unmapped folds into the queries instead (`_fold_into_queries`)."""

  def infer(mesh, arg_shapes, result_shape):
    del result_shape
    out = _batch_sharding(mesh, arg_shapes)
    return out if num_outputs == 1 else (out,) * num_outputs

  def partition(mesh, arg_shapes, result_shape):
    del result_shape
    sharding = _batch_sharding(mesh, arg_shapes)
    outs = sharding if num_outputs == 1 else (sharding,) * num_outputs
    return mesh, call, outs, (sharding,) * len(arg_shapes)

  part = custom_partitioning(call)
  part.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=rule, need_replication_factors=_REPLICATED_FACTORS)

  batched = jax.custom_batching.custom_vmap(lambda *args: part(*args))

  @batched.def_vmap
  def _fold(axis_size, in_batched, *args):
    if queries_foldable and not in_batched[0]:
      return _fold_into_queries(batched, axis_size, in_batched, *args), True
    # (n, B, ...) -> (n * B, ...), inputs not mapped broadcast first.
    args = [x if bat else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, bat in zip(args, in_batched)]
    b = args[0].shape[1]  # explicit sizes: -1 is ambiguous for zero-size arrays
    outs = batched(*[x.reshape(axis_size * b, *x.shape[2:]) for x in args])
    unfold = lambda y: y.reshape(axis_size, b, *y.shape[1:])
    if num_outputs == 1:
      return unfold(outs), True
    return tuple(unfold(y) for y in outs), (True,) * num_outputs

  return batched


def _fold_into_queries(forward, axis_size, in_batched, value, *query_args):
  """The forward under vmap with the value map shared (not mapped): the n query sets become
  one call's queries, (n, B, Q, ...) -> (B, n * Q, ...), so value is not copied n times.

  Only the forward can do this: the backward must return one value gradient per mapped
  element, so there value is broadcast like any other input.
  """
  # Explicit sizes: -1 is ambiguous for zero-size arrays.
  b, q = value.shape[0], query_args[0].shape[2 if in_batched[1] else 1]
  folded = []
  for x, bat in zip(query_args, in_batched[1:]):
    # (n, B, Q, ...) -> (B, n, Q, ...); an unmapped (B, Q, ...) is broadcast to that.
    x = jnp.moveaxis(x, 0, 1) if bat else jnp.broadcast_to(
        x[:, None], (b, axis_size, *x.shape[1:]))
    folded.append(x.reshape(b, axis_size * q, *x.shape[3:]))
  out = forward(value, *folded)  # (B, n * Q, M, D)
  return jnp.moveaxis(out.reshape(b, axis_size, q, *out.shape[2:]), 1, 0)


@functools.lru_cache(maxsize=None)
def _ops(spatial_shapes):
  """(forward, backward) partitioned ops for one static set of level shapes."""
  return (_partitioned(functools.partial(_forward_call, spatial_shapes), 1, _FORWARD_RULE,
                       queries_foldable=True),
          _partitioned(functools.partial(_backward_call, spatial_shapes), 3, _BACKWARD_RULE))


def _forward(value, spatial_shapes, loc, attn):
  ct = _compute_dtype(value, loc, attn)
  return _ops(spatial_shapes)[0](value.astype(ct), loc.astype(ct), attn.astype(ct))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _msda(value, spatial_shapes, loc, attn):
  """-> (B, Q, M, D) in the compute dtype."""
  return _forward(value, spatial_shapes, loc, attn)


def _msda_fwd(value, spatial_shapes, loc, attn):
  # Residuals in the inputs' own dtypes (bf16 stays bf16): cast again in the backward.
  return _forward(value, spatial_shapes, loc, attn), (value, loc, attn)


def _msda_bwd(spatial_shapes, residuals, g):
  ct = _compute_dtype(*residuals)
  grads = _ops(spatial_shapes)[1](*(x.astype(ct) for x in residuals), g.astype(ct))
  return tuple(gr.astype(x.dtype) for gr, x in zip(grads, residuals))


_msda.defvjp(_msda_fwd, _msda_bwd)


def ms_deform_attn_cpu(value: jax.Array, spatial_shapes, sampling_locations: jax.Array,
                       attention_weights: jax.Array) -> jax.Array:
  """The kernel's sampler: (B, S, M, D), static ((H, W), ...), (B, Q, M, L, P, 2),
  (B, Q, M, L, P) -> (B, Q, M * D) in value's dtype. Inputs are validated by the caller
  (`ms_deform_attn`). Raises RuntimeError when the kernel cannot be built here.
  """
  _register()
  b, _, m, d = value.shape
  q = sampling_locations.shape[1]
  shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  out = _msda(value, shapes, sampling_locations, attention_weights)
  return out.reshape(b, q, m * d).astype(value.dtype)
