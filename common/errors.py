"""The one exception type for a user's mistake.

A `UserError` carries a message that names the file or flag at fault and says what to do. The CLI prints it
without a traceback and exits with status 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a flag with an impossible value, a model folder of the wrong kind."""
