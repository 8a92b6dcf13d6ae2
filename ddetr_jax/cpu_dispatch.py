"""Synchronous dispatch for JAX's CPU backend: the entry points' default on CPU runs.

JAX's CPU client runs a jitted computation asynchronously by default: the call returns at once
and the computation executes on another thread. On this project's 2-core CI machine (Intel Xeon,
2026-12-03) the same compiled train step ran about 10% faster when dispatched synchronously
(`jax_cpu_enable_async_dispatch=False`), median of 8-30 steps, the two alternating:

| config (batch, image) | asynchronous s/step | synchronous s/step |
|---|---|---|
| shapes demo (8, 128 px) | 0.157-0.159 | 0.139-0.144 |
| tiny (2, 256 px) | 0.176-0.178 | 0.162-0.166 |
| full ResNet-50 (2, 256 px) | 1.217-1.243 | 1.107 |

The cause was not traced inside XLA. A pointer: an asynchronously dispatched step that contains
a host callback (`jax.pure_callback`, even one that returns its input) runs at the synchronous
speed too (1.103-1.126 s for the full step), which is why the host scipy matcher had looked
faster than the in-graph one at 300 queries.

`use_synchronous_cpu_dispatch()` sets the option unless the environment variable
DDETR_JAX_ASYNC_DISPATCH=1 asks to keep JAX's default. It only affects the CPU backend (GPU and
TPU dispatch is unchanged), and must run before JAX creates its CPU client, i.e. before the
first computation or device query: `train.py`, `eval.py` and `benchmarks/train_step.py` call it
at start-up.
"""
import os

import jax

KEEP_ASYNC_ENV = "DDETR_JAX_ASYNC_DISPATCH"


def use_synchronous_cpu_dispatch() -> bool:
  """Turns off asynchronous CPU dispatch (see module doc); returns whether it did."""
  if os.environ.get(KEEP_ASYNC_ENV) == "1":
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True
