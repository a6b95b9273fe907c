"""`python -m gemmalite.cli ...`, the same as the `gemmalite` console script."""

import sys

from . import main

sys.exit(main())
