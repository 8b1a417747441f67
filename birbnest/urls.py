"""Top-level routes: the cache API, health and metrics, the admin console."""

from django.contrib import admin
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt

from birbnest.errors import json_404
from cache_api import openapi
from cache_api import urls as cache_api_urls
from ops import views as ops_views
from ops.console import urls as console_urls
from ops.ratelimit import api as ratelimit_api

urlpatterns = [
    # First: the data plane is most of the traffic, and patterns are tried in order.
    *cache_api_urls.urlpatterns,
    # The OpenAPI document and its Swagger UI page (importing cache_api.openapi also registers the
    # data plane's descriptions with drf-spectacular).
    *openapi.urlpatterns,
    path("", ops_views.root, name="root"),
    path("health", ops_views.health_view, name="health"),
    path("metrics", ops_views.metrics_view, name="metrics"),
    path("metrics/prometheus", ops_views.prometheus_view, name="metrics-prometheus"),
    path("admin/ratelimit", ratelimit_api.ratelimit_settings_api, name="admin-ratelimit"),
    path("admin/deadletters/", include(console_urls.deadletter_urlpatterns)),
    path("admin/dashboard/", include(console_urls.dashboard_urlpatterns)),
    path("admin/", admin.site.urls),
    # Unknown paths get the contract's JSON 404 in every mode (handler404 only acts without DEBUG).
    re_path(r"^", csrf_exempt(json_404)),
]

handler400 = "birbnest.errors.json_400"
handler404 = "birbnest.errors.json_404"
handler500 = "birbnest.errors.json_500"
