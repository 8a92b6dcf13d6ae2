"""Errors in what the user asked for (config, flags, checkpoints, data paths), not in the code.

`train.py` and `eval.py` print a `UserError` as one line, `error: <message>`, and exit with
status 2; every other exception keeps its traceback (`ddetr_jax.cli.run`). The concrete classes
also derive from the built-in type that callers already catch:
  InvalidInputError(UserError, ValueError)          a config value, checkpoint or annotation file
                                                    that cannot be used as given
  MissingInputError(UserError, FileNotFoundError)   a checkpoint, dataset or file that is not there
"""


class UserError(Exception):
  """An error the user fixes by changing the command, config or files; the message says how."""


class InvalidInputError(UserError, ValueError):
  """A config value, checkpoint or data file that does not fit (e.g. params of other shapes)."""


class MissingInputError(UserError, FileNotFoundError):
  """A checkpoint, dataset or file named by the config or a flag does not exist."""
