"""The one exception type for mistakes a user can fix (bad data, bad config, bad files).

Entry points catch it and print its message on one line instead of a traceback.
"""


class UserError(Exception):
    """A problem with the user's input; the message names the file or field and what was expected."""
