"""`POST /admin/ratelimit` (placeholder)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from cache_api.errors import error_response


@csrf_exempt
def ratelimit_settings_api(request: HttpRequest) -> HttpResponse:
    return error_response(501, "INTERNAL_ERROR", "not implemented yet")
