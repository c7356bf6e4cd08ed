"""``python -m dps_tune.cli ARGS``: the same as ``dps-tune ARGS``."""

import sys

from dps_tune.cli import main

sys.exit(main())
