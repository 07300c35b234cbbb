"""WSGI entry point: ``gunicorn -c gunicorn.conf.py wsgi:app``.

Loads ``.env`` (or the file named by ``LLM_SERVICE_ENV_FILE``) into the
environment without overriding variables already set, then builds the app.
"""

import os
import sys
from pathlib import Path

from llm_service import create_app
from llm_service.config import ConfigError, load_env_file, unknown_variables

load_env_file(Path(__file__).with_name(".env"))
for warning in unknown_variables(os.environ):
    sys.stderr.write(f"llm-service: warning: {warning}\n")

try:
    app = create_app()
except ConfigError as err:
    sys.stderr.write(f"llm-service: configuration error: {err}\n")
    raise SystemExit(3) from None
