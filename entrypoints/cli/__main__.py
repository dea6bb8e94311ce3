"""`python -m entrypoints.cli`: the `contentml` command."""

import sys

from entrypoints.cli import main

sys.exit(main())
