"""Folders a run writes to (a training workdir, eval.py's --workdir and --out, a converted
checkpoint's --out): made, or checked, before any long work, so that a path that cannot be a
folder (a file in the way, a parent that is a file, no permission, a read-only file system) is
one user error naming it instead of an OSError at the end of the work, or a hung writer thread.
"""
import os
from typing import Optional

from ddetr_jax import errors


def make(path: str, shown: str) -> None:
  """Creates the folder `path` and its parents (nothing happens if it is a folder already).

  Args:
    path: the folder.
    shown: how error messages name it, e.g. "workdir '/runs/a'" or "--out='pred'".
  Raises:
    errors.InvalidInputError "{shown} is a file (or a link to nothing), not a folder" or
    "{shown} cannot be created:
    {reason} ({the path the system refused})".
  """
  refuse_non_folder(path, shown)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise errors.InvalidInputError(
        f"{shown} cannot be created: {e.strerror or e} ({e.filename or path})") from None


def refuse_non_folder(path: str, shown: str) -> None:
  """Raises errors.InvalidInputError "{shown} is a file (or a link to nothing), not a folder"
  when something that is not a folder is at `path`; an absent path or a folder passes."""
  if os.path.lexists(path) and not os.path.isdir(path):
    what = ("a link to nothing" if os.path.islink(path) and not os.path.exists(path)
            else "a file")
    raise errors.InvalidInputError(f"{shown} is {what}, not a folder")


def why_not_creatable(path: str) -> Optional[str]:
  """Why the absent folder `path` could not be made, without making anything; None if it could.

  Judged by its nearest existing ancestor: one that is not a folder, or one this user may not
  write in, is the reason ("'/a/file' is a file, not a folder", "no permission to write in '/a'").
  """
  ancestor = os.path.dirname(os.path.abspath(path))
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    return f"{ancestor!r} is a file, not a folder"
  if not os.access(ancestor, os.W_OK | os.X_OK):
    return f"no permission to write in {ancestor!r}"
  return None
