"""The one door to the model servers: views, streaming and the CLI touch nothing else.

:class:`~.pool.Upstream` opens every call and stream for a request: it resolves
the model, fills in the request defaults, gives each call a scope that is
cancelled when the client hangs up (:mod:`.hangups`), sends the correlation ID
upstream (a hook of the client), and keeps its own health cache. Only this
package imports :mod:`llm_service.lmstudio.client`.
"""

from ..lmstudio.client import CallObserver, CallRecord
from ..lmstudio.errors import LMStudioError
from .hangups import DisconnectWatcher, disconnects, hangup_scope
from .pool import EXTENSION, HealthReport, Upstream, get_upstream, init_app

__all__ = [
    "EXTENSION",
    "CallObserver",
    "CallRecord",
    "DisconnectWatcher",
    "HealthReport",
    "LMStudioError",
    "Upstream",
    "disconnects",
    "get_upstream",
    "hangup_scope",
    "init_app",
]
