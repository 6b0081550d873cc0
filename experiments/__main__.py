"""``python -m experiments NAME [--scale paper|cpu|smoke] ...``: see :mod:`experiments.common`."""

import sys

from experiments.common import main

sys.exit(main())
