"""``clipxfer serve``: an HTTP API and a web page to search, classify and label an index.

``create_app(ServeConfig(index=...))`` builds the FastAPI app; :func:`serve` runs it under uvicorn
(both in :mod:`.server`). The web dependencies are the optional extra ``clipxfer[serve]``, imported
only once :func:`require_serve_extra` has checked them: nothing imported here needs them.
"""

from .active import suggest
from .config import ServeConfig
from .security import check_host, is_loopback
from .server import create_app, require_serve_extra, serve

__all__ = ["ServeConfig", "check_host", "create_app", "is_loopback", "require_serve_extra", "serve", "suggest"]
