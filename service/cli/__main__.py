"""`python -m service.cli` runs the command line."""

import sys

from service.cli.main import main

sys.exit(main())
