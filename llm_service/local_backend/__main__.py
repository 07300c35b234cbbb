"""Run the local model server CLI: ``python -m llm_service.local_backend``."""

import sys

from .cli import main

sys.exit(main())
