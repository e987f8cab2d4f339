"""``python -m fedmagic``: the same as the ``fedmagic`` command."""

import sys

from .cli import main

sys.exit(main())
