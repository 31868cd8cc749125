"""Errors that map to exit codes: 0 done, 2 bad usage/config/input, 1 anything else."""


class UsageError(Exception):
  """Bad usage, config or input. The CLI prints the message and exits with 2.

  The message must name the problem: the file, key, shape, or valid choices.
  """

  exit_code = 2


class StoppedError(Exception):
  """Training stopped on purpose (e.g. too many non-finite steps). The CLI prints the
  message, which names the cause and the last good checkpoint, and exits with 1."""

  exit_code = 1
