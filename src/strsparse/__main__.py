"""``python -m strsparse``: the same as the ``strsparse`` command."""

import sys

from strsparse.cli import main

if __name__ == "__main__":
    sys.exit(main())
