"""WSGI entry point: ``gunicorn wsgi:app`` (settings in gunicorn.conf.py)."""

import sys

from dotenv import load_dotenv

from llm_service import create_app
from llm_service.config import ConfigError

load_dotenv()

try:
    app = create_app()
except ConfigError as err:
    sys.stderr.write(f"llm-service: configuration error: {err}\n")
    raise SystemExit(3) from None
