"""The one error type for bad user input."""


class UserError(Exception):
    """Bad input (unknown name, malformed suite, missing weights): the CLI prints the
    message on one line and exits with code 2, without a traceback."""
