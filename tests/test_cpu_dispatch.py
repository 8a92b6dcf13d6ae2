"""cpu_dispatch: the entry points turn off JAX's asynchronous CPU dispatch unless asked not to."""
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_PROBE = """
import jax, jax.numpy as jnp
from ddetr_jax import cpu_dispatch
changed = cpu_dispatch.use_synchronous_cpu_dispatch()
value = float(jax.jit(lambda x: (x * 2).sum())(jnp.arange(4.0)))  # computes after the change
print(changed, jax.config.values["jax_cpu_enable_async_dispatch"], value)
"""


def _probe(env_value):
  env = {k: v for k, v in os.environ.items() if k != "DDETR_JAX_ASYNC_DISPATCH"}
  if env_value is not None:
    env["DDETR_JAX_ASYNC_DISPATCH"] = env_value
  out = subprocess.run([sys.executable, "-c", _PROBE], cwd=_ROOT, env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  return out.stdout.split()


@pytest.mark.parametrize("env_value,expected", [(None, ["True", "False", "12.0"]),
                                                ("0", ["True", "False", "12.0"]),
                                                ("1", ["False", "True", "12.0"])])
def test_synchronous_unless_the_environment_keeps_async(env_value, expected):
  assert _probe(env_value) == expected


def test_train_and_eval_entry_points_make_dispatch_synchronous(monkeypatch):
  from ddetr_jax import cli  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(cli.host_malloc, "reexec_with_huge_pages", lambda: calls.append("thp"))
  monkeypatch.setattr(cli.cpu_dispatch, "use_synchronous_cpu_dispatch",
                      lambda: calls.append("sync"))
  monkeypatch.setattr(cli.xla_gpu_flags, "disable_triton_gemm", lambda: calls.append("gemm"))
  monkeypatch.setattr(cli.app, "run", lambda main, **kwargs: calls.append("app"))
  cli.run(lambda argv: None)
  assert calls == ["thp", "sync", "gemm", "app"]
