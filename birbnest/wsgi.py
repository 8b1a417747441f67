"""WSGI entry point: the REST API is served through WSGI (granian), see README "Serving model".

Two Django handlers share one process, settings, URLconf and views:

- ``/v1/`` (the data plane) runs only ``DATA_PLANE_MIDDLEWARE``: metrics, API keys, the rate
  limiter and the security headers. Sessions, CSRF, authentication, messages and static files serve the
  admin; a cache read does not use them. It also skips Django's ``request_started`` /
  ``request_finished`` signals, whose receivers look at every database and cache connection
  after each request; it returns a PostgreSQL connection to the pool itself, in the rare request
  that used one (a read-through miss). On 2 cores these costs were most of a cache hit's
  (BENCHMARKS.md, history).
- everything else (admin, health, metrics, root) runs the full ``MIDDLEWARE`` and handler.

Request bodies are read before either handler runs, on a deadline and into memory
(``birbnest/request_body.py``): slow senders cannot hold the request threads, and chunked
bodies are read too.

With ``OTEL_TRACES_ENABLED`` the application is wrapped in a request span
(``birbnest/tracing.py``); without it, nothing of tracing runs.

After start-up the objects loaded so far are frozen out of the garbage collector's reach
(``gc.freeze()``): a full collection no longer walks Django's ~90,000 long-lived objects.
"""

import gc
import os
from collections.abc import Callable
from typing import Any, cast

import django
from django.conf import settings
from django.core.exceptions import MiddlewareNotUsed
from django.core.handlers.exception import convert_exception_to_response
from django.core.handlers.wsgi import WSGIHandler, get_script_name
from django.db import close_old_connections, connection
from django.http import HttpResponse
from django.urls import set_script_prefix
from django.utils.module_loading import import_string

from birbnest import tracing

DATA_PLANE_PREFIX = "/v1/"


class DataPlaneHandler(WSGIHandler):
    """A WSGIHandler whose middleware chain is ``settings.DATA_PLANE_MIDDLEWARE``.

    Those middlewares must be plain synchronous callables (no ``process_view`` or
    ``process_exception`` hooks); the views, URLconf and error handlers are the same as the
    full handler's.
    """

    def load_middleware(self, is_async: bool = False) -> None:
        self._view_middleware: list[Callable[..., Any]] = []
        self._template_response_middleware: list[Callable[..., Any]] = []
        self._exception_middleware: list[Callable[..., Any]] = []
        # _get_response is BaseHandler's private view caller; django-stubs leaves it out.
        handler = convert_exception_to_response(self._get_response)  # type: ignore[attr-defined]
        for path in reversed(settings.DATA_PLANE_MIDDLEWARE):
            try:
                handler = convert_exception_to_response(import_string(path)(handler))
            except MiddlewareNotUsed:  # e.g. the key check with API_AUTH=off
                continue
        self._middleware_chain = handler

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        set_script_prefix(get_script_name(environ))
        response = self.get_response(self.request_class(environ))
        if response.streaming or response.cookies:  # not on the data plane today; the general path
            # As Django's WSGIHandler does: close() sends request_finished from it. Not in django-stubs.
            response._handler_class = self.__class__  # type: ignore[attr-defined]
            start_response(f"{response.status_code} {response.reason_phrase}", list(response.items()))
            return response
        body = cast(HttpResponse, response).content  # not streaming: an HttpResponse
        headers = list(response.items())
        if response.status_code not in (204, 304):  # those must not carry one
            # A length lets the server send the answer in one piece instead of chunked.
            headers.append(("Content-Length", str(len(body))))
        start_response(f"{response.status_code} {response.reason_phrase}", headers)
        if connection.connection is not None:  # a read-through used PostgreSQL: back to the pool
            close_old_connections()
        return [body]


def get_application() -> Any:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "birbnest.settings")
    django.setup(set_prefix=False)
    from birbnest.request_body import body_reader, buffered

    full, data_plane = WSGIHandler(), DataPlaneHandler()
    reader = body_reader()

    def application(environ: dict[str, Any], start_response: Any) -> Any:
        # Bodies are read first, on a deadline (birbnest/request_body.py): a client that never
        # sends its body gets 408 instead of holding a request thread.
        if (refused := buffered(reader, environ, start_response)) is not None:
            return refused
        if environ.get("PATH_INFO", "").startswith(DATA_PLANE_PREFIX):
            return data_plane(environ, start_response)
        return full(environ, start_response)

    if tracing.configure(settings.BIRB, component="api"):
        # Only with OTEL_TRACES_ENABLED: with it off, requests do not pass through this at all.
        application = tracing.wsgi_middleware(application)
    if settings.BIRB.api_debug_port:  # the debug endpoints (birbnest/pprof): imported only when on
        from birbnest import pprof

        pprof.start(settings.BIRB, role="api")
    gc.freeze()
    return application


application = get_application()
