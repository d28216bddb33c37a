"""``python -m service.cli``: the ``steady`` command."""

import sys

from service.cli import main

sys.exit(main())
