"""``python -m gateway`` is ``taxiway``."""

import sys

from gateway.cli import main

sys.exit(main())
