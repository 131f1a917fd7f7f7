"""The HTTP routes of ``clipxfer serve``, one module per area. Each adds its endpoints to the app's
own router (``app.router``) and takes the :class:`~clipxfer.serve.state.ServeState` they share.

Why not one ``APIRouter`` per area joined with ``include_router``: FastAPI (0.16x) keeps an included
router as a nested one, matched again on every request, which costs each request routed past it
about 30 us (raw ASGI calls, this app: 67 -> 95 us for a route in the fourth router).
"""

from .classify import add_classify_routes
from .labelling import add_labelling_routes
from .page import add_page_routes
from .search import add_search_routes
from .system import add_metrics_route, add_system_routes

__all__ = [
    "add_classify_routes", "add_labelling_routes", "add_metrics_route", "add_page_routes", "add_search_routes",
    "add_system_routes",
]  # fmt: skip
