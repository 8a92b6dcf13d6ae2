"""What train.py and eval.py share on the command line: config overrides, log level, user errors.

  check_config_overrides(argv, default_config)  call before `config_flags.DEFINE_config_file`
      (which applies the overrides while defining the flag when --config is not given): an
      override `--config.a.b=V` naming no field of the config prints
      `error: --config.a.b: config.a has no field 'b'; did you mean --config.a.c?` and exits
      with status 2, where ml_collections would end a traceback with a garbled AttributeError.
  run(main)  absl's `app.run(main)`, after restarting with transparent huge pages where they
      apply (`host_malloc.reexec_with_huge_pages`) and making CPU dispatch synchronous
      (`cpu_dispatch`), with two changes: absl and orbax log at WARNING (orbax logs every
      checkpoint save and restore at INFO) unless --verbosity is given (`--verbosity=0` shows
      them); and an `errors.UserError` is printed as `error: <message>` on stderr with exit
      status 2 and no traceback. Any other exception keeps its traceback.
"""
import difflib
import re
import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections.config_flags import config_flags as ml_config_flags

from ddetr_jax import cpu_dispatch
from ddetr_jax import errors
from ddetr_jax import host_malloc

USER_ERROR_EXIT_STATUS = 2


def _unknown_field(config: config_dict.ConfigDict, field_path: str) -> Optional[str]:
  """Why `field_path` ('train.num_train_steps') names no field of `config`, or None if it does.

  The message names the first missing key, where it was looked for, and up to 3 close matches
  (difflib), else that level's fields. Paths below a value that is not a ConfigDict, or with an
  index (`a[0]`), are left to ml_collections (None).
  """
  node, walked = config, ["config"]
  for name in field_path.split("."):
    if not isinstance(node, config_dict.ConfigDict) or "[" in name:
      return None
    if name not in node:
      where = ".".join(walked)
      fields = sorted(node.keys())
      close = difflib.get_close_matches(name, fields, n=3)
      hint = ("did you mean " + " or ".join(f"--{where}.{c}" for c in close) + "?" if close
              else f"its fields are {', '.join(fields)}")
      return f"--config.{field_path}: {where} has no field {name!r}; {hint}"
    node = node[name]
    walked.append(name)
  return None


def _config_argument(argv: Sequence[str], default: str) -> str:
  """The value of the last --config=V / --config V in argv, else `default`."""
  value = default
  for i, arg in enumerate(argv):
    match = re.fullmatch(r"--?config(=(.*))?", arg)
    if match and match.group(1):
      value = match.group(2)
    elif match and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def check_config_overrides(argv: Sequence[str], default_config: str) -> None:
  """Exits with status 2 and one line on stderr if a --config.* override names no config field.

  Args:
    argv: the command line (sys.argv); --flagfile arguments are expanded.
    default_config: the --config default (`path.py` or `path.py:variant`).

  A config that does not load, or a command line absl cannot read, is left to absl and
  ml_collections to report.
  """
  try:
    argv = flags.FLAGS.read_flags_from_files(list(argv), force_gnu=False)
  except flags.Error:
    return
  overrides = [m.group(2) for m in (re.match(r"--?(no)?config\.([^=]+)", a) for a in argv) if m]
  if not overrides:
    return
  try:
    config = ml_config_flags.ConfigFileFlagParser(name="config", lock_config=False).parse(
        _config_argument(argv, default_config))
  except Exception:  # pylint: disable=broad-except  (reported by ml_collections itself)
    return
  if not isinstance(config, config_dict.ConfigDict):
    return
  for field_path in overrides:
    message = _unknown_field(config, field_path)
    if message:
      print(f"error: {message}", file=sys.stderr)
      sys.exit(USER_ERROR_EXIT_STATUS)


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)`, quiet unless --verbosity is given, printing user errors as one line.

  First restarts the process with transparent huge pages for glibc's large blocks where that
  applies (`host_malloc.reexec_with_huge_pages`, opt-in: DDETR_JAX_HUGE_PAGES=1), then makes
  CPU dispatch synchronous (`cpu_dispatch`; DDETR_JAX_ASYNC_DISPATCH=1 keeps JAX's default).
  """
  host_malloc.reexec_with_huge_pages()
  cpu_dispatch.use_synchronous_cpu_dispatch()

  def main_printing_user_errors(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except errors.UserError as e:
      sys.stdout.flush()
      print(f"error: {e}", file=sys.stderr)
      return USER_ERROR_EXIT_STATUS

  app.run(main_printing_user_errors)
