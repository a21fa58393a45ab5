"""The ``bsconv-surgery`` console script.

It lives outside the package on purpose: importing ``bsconv_surgery`` imports torch, timm and
torchvision (a second or two), and a Ctrl-C in that time must end the command quietly with exit
code 130, not with a ``KeyboardInterrupt`` traceback. A module inside the package could not catch
it: the package is imported before any of its modules runs.
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
