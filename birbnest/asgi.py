"""ASGI entry point: only the live dashboard's websocket (`manage.py rundashboard`).

The REST API and the admin pages are served through WSGI (granian): Django under ASGI is several
times slower on these machines (README "Serving model"). So plain HTTP here gets a one-line
answer rather than Django's ASGI handler.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "birbnest.settings")

# Sets Django up; it must run before anything below imports models (channels' auth, ours).
get_asgi_application()

from typing import Any  # noqa: E402

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from ops.console import dashboard  # noqa: E402

Scope = dict[str, Any]


async def plain_http(scope: Scope, receive: Any, send: Any) -> None:
    """200 on `/` (a liveness probe), 404 elsewhere: this server only speaks websocket."""
    found = scope["path"] == "/"
    body = b"dashboard websocket server\n" if found else b"not found: this server only serves /ws/dashboard/\n"
    await send(
        {
            "type": "http.response.start",
            "status": 200 if found else 404,
            "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def lifespan(scope: Scope, receive: Any, send: Any) -> None:
    """Nothing to start (the sampler starts with the first websocket); stop it on shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            dashboard.hub.stop()
            await send({"type": "lifespan.shutdown.complete"})
            return


# Channels routes ASGI apps with Django's path(); django-stubs types path() for views only, and
# types-channels wants a pattern type of its own that path() never returns: stubs, not code, disagree.
websocket_urlpatterns = [path(dashboard.WEBSOCKET_PATH, dashboard.DashboardConsumer.as_asgi())]  # type: ignore[arg-type]

application = ProtocolTypeRouter(
    {
        "http": plain_http,
        "lifespan": lifespan,
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),  # type: ignore[arg-type]
    }
)
