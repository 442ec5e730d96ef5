"""``python -m rollout_fast.check MODEL``: see :mod:`rollout_fast.check`."""

import sys

from . import main

sys.exit(main())
