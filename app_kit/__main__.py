"""``python -m app_kit``: see :mod:`app_kit.cli`."""

import sys

from .app.cli import main

sys.exit(main())
