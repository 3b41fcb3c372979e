"""Errors a user can act on. The CLI prints each as one line and exits with `exit_code`."""


class GelugemmError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code = 2


class LaunchError(GelugemmError, ValueError):
    """A kernel was asked to run on shapes, dtypes, strides or devices it does not take."""


class BackendUnavailable(GelugemmError, RuntimeError):
    """The backend asked for cannot run here (for example `triton` without a GPU)."""
