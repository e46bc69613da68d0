"""``python -m medad_fast.cli`` and ``torchrun -m medad_fast.cli``."""

import sys

from . import main

sys.exit(main())
