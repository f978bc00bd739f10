"""The one error type for mistakes a user can fix.

Every deliberate check in minidiff (a wrong shape, a value out of range, a checkpoint that does
not fit) raises `InputError`, a `ValueError`, so code that catches ValueError keeps working. The
`minidiff` command prints an InputError as one sentence and exits with status 2; anything else
is minidiff's own bug and keeps its traceback (as does everything with `--debug` or
MINIDIFF_DEBUG=1). Missing files raise the built-in FileNotFoundError / FileExistsError, which
the command treats the same way.

This module imports nothing from minidiff, so every layer (kernels included) may use it.
"""


class InputError(ValueError):
    """A mistake in what the user passed: the message says what was expected and how to fix it."""


class NonFiniteError(InputError):
    """NaN or inf appeared where a number was needed (arguments, masks, latents in a loop)."""
