"""The base of every error a user can fix: bad options, files, data, devices.

It lives at the bottom layer so that ``models/`` and ``training/`` both derive their error
types from it. The entry points catch ``UserError`` alone and print its one-line message;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with what the user gave us (an option, a file, a device); one-line message."""
