"""User-facing errors: printed as one clear message by the CLI, never as a traceback."""


class UserError(Exception):
    """Bad input or configuration that the user can fix; the message names what and where."""
