"""``python -m bsconv_surgery``: the command line, as the ``bsconv-surgery`` console script."""

import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while click and rich import; torch imports later, inside a command
    sys.stderr.write("Interrupted.\n")
    raise SystemExit(130) from None

if __name__ == "__main__":
    main()
