"""The one exception type the CLIs turn into a one-line error and a non-zero exit."""


class UserError(Exception):
    """Bad input the user can fix (a path, a name, a flag); printed without a traceback."""
