"""`python -m runtime ...` is the `tokenrelay` command."""
import sys

from runtime.cli import main

if __name__ == "__main__":
    sys.exit(main())
