"""`python -m vithybrid_fast <command> ...`: the same commands as `vithybrid-fast`, also under torchrun."""

import sys

from .cli import main

sys.exit(main())
