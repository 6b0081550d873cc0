"""``python -m experiments NAME [--smoke] ...``: see :mod:`experiments.common`."""

import sys

from experiments.common import main

sys.exit(main())
