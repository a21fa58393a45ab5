"""The one exception type for problems the user can fix (bad input, bad files, bad options)."""


class SurgeryError(Exception):
    """An expected failure with a message written for the user.

    The CLI prints the message as one paragraph and exits non-zero, without a traceback.
    """
