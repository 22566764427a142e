"""``python -m relay.bench``: see :mod:`relay.bench.runner`."""

import sys

from relay.bench.runner import main

sys.exit(main())
