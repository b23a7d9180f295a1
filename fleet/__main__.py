"""`python -m fleet` is the `fleet` command."""

import sys

from fleet.cli import main

sys.exit(main())
