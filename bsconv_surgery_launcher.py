"""The ``bsconv-surgery`` console script.

It lives outside the package so that a Ctrl-C at any moment of the start-up ends the command
quietly with exit code 130, not with a ``KeyboardInterrupt`` traceback: while click and rich import
(here), and while a command's modules and torch import (``SurgeryGroup.invoke``).
"""

import sys


def main() -> None:
    try:
        from bsconv_surgery.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("Interrupted.\n")
        raise SystemExit(130) from None
    cli_main()


if __name__ == "__main__":
    main()
