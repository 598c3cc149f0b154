"""`python -m cpmctl`: the same command line as the `cpmctl` script."""

from cpmctl.cli import main

main()
