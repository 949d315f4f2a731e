"""Exceptions that separate user errors (one clear line, exit 2) from failures of ours."""


class AutoRegisterError(Exception):
    """Base class of every error AutoRegister raises on purpose."""


class InputError(AutoRegisterError, ValueError):
    """Bad input from the user: a missing or unreadable file, an unusable image, a bad option or table."""


class BackendUnavailable(AutoRegisterError):
    """A registration backend cannot run here; the message says why."""


class Cancelled(AutoRegisterError):
    """The user cancelled the run."""
