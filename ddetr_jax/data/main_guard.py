"""Data workers and the main script: refuse to start them from its unguarded top-level code.

With `data.num_workers` > 0 the loader runs grain worker processes, which multiprocessing
starts with "spawn": each worker first re-runs the main script (as module `__mp_main__`). Code
at the script's top level that is not under `if __name__ == "__main__":` then runs again in
every worker; when that code is what makes the iterator, the worker dies in multiprocessing's
bootstrapping check, and the parent (grain 0.2.18) waits for its batches forever. Measured
2026-12-03: a 9-line script doing that hung until killed.

`check_main_is_guarded()` catches that case before any worker starts. It looks for the main
script's top-level frame on the call stack and raises `errors.InvalidInputError`, naming the
file and line, when that line is not inside an `if __name__ == "__main__":` block. It says
nothing for an interactive session, `python -c`, or a script it cannot read or parse: those are
not re-run by spawn, or cannot be judged.
"""
import ast
import functools
import sys
from types import FrameType
from typing import Optional

from ddetr_jax import errors


def _is_main_test(test: ast.expr) -> bool:
  """`__name__ == "__main__"`, either way round."""
  if not (isinstance(test, ast.Compare) and len(test.ops) == 1
          and isinstance(test.ops[0], ast.Eq)):
    return False
  sides = (test.left, test.comparators[0])
  return (any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides)
          and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides))


@functools.lru_cache(maxsize=8)
def _guarded_ranges(source: str) -> tuple[tuple[int, int], ...]:
  """(first, last) line of every `if __name__ == "__main__":` body in `source`."""
  ranges = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.If) and _is_main_test(node.test):
      ranges.append((node.body[0].lineno, node.body[-1].end_lineno))
  return tuple(ranges)


def is_guarded(source: str, line: int) -> bool:
  """Whether line `line` (1-based) of `source` is inside an `if __name__ == "__main__":` body."""
  return any(first <= line <= last for first, last in _guarded_ranges(source))


def _main_script_frame() -> Optional[FrameType]:
  """The frame running the main script's top-level code, if it is on the stack."""
  frame = sys._getframe(1)  # pylint: disable=protected-access
  while frame is not None:
    if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__main__":
      return frame
    frame = frame.f_back
  return None


def check_main_is_guarded(what: str) -> None:
  """Raises errors.InvalidInputError if worker processes started now would re-run this call.

  Args:
    what: the setting that starts the workers, for the message (e.g. "data.num_workers=2").
  """
  frame = _main_script_frame()
  if frame is None or not getattr(sys.modules.get("__main__"), "__file__", None):
    return
  path, line = frame.f_code.co_filename, frame.f_lineno
  try:
    with open(path, encoding="utf-8") as f:
      source = f.read()
    guarded = is_guarded(source, line)
  except (OSError, SyntaxError, ValueError):
    return
  if not guarded:
    raise errors.InvalidInputError(
        f"{what} starts data worker processes, and each of them first re-runs the main script "
        f"{path}; its line {line}, which got here, is not under `if __name__ == \"__main__\":`, "
        f"so every worker would run it again and fail, and this process would wait for them "
        f"forever. Move that code into a function called under `if __name__ == "
        f"\"__main__\":` (as train.py does), or set data.num_workers=0")
