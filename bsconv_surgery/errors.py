"""The one exception type for problems the user can fix (bad input, bad files, bad options)."""


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"`` (the line cut at ``limit`` characters), for
    messages that quote an underlying failure without its traceback."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


class SurgeryError(Exception):
    """An expected failure with a message written for the user.

    The CLI prints the message as one paragraph and exits non-zero, without a traceback.
    """
