"""`python -m tfp_naf`: the `tfp-naf` command line."""

import sys

from tfp_naf.cli import main

if __name__ == "__main__":
    sys.exit(main())
