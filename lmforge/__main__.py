"""`python -m lmforge` runs the command line."""

import sys

from lmforge.cli import main

sys.exit(main())
