"""Run the local model server CLI: ``python -m local_backend``."""

import sys

from .cli import main

sys.exit(main())
