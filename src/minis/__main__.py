"""`python -m minis ...`: the `minis` command line (`minis.cli`)."""

import sys

from .cli import main

sys.exit(main())
