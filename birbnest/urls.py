"""Top-level routes: the cache API, health and metrics, the admin console."""

from django.contrib import admin
from django.urls import include, path, re_path
from django.views.decorators.csrf import csrf_exempt

from cache_api import urls as cache_api_urls
from cache_api.errors import json_404
from ops import ratelimit_api
from ops import views as ops_views

urlpatterns = [
    # First: the data plane is most of the traffic, and patterns are tried in order.
    *cache_api_urls.urlpatterns,
    path("", ops_views.root, name="root"),
    path("health", ops_views.health_view, name="health"),
    path("metrics", ops_views.metrics_view, name="metrics"),
    path("metrics/prometheus", ops_views.prometheus_view, name="metrics-prometheus"),
    path("admin/ratelimit", ratelimit_api.ratelimit_settings_api, name="admin-ratelimit"),
    path("admin/deadletters/", include("ops.deadletter_urls")),
    path("admin/dashboard/", include("ops.dashboard_urls")),
    path("admin/", admin.site.urls),
    # Unknown paths get the contract's JSON 404 in every mode (handler404 only acts without DEBUG).
    re_path(r"^", csrf_exempt(json_404)),
]

handler404 = "cache_api.errors.json_404"
handler500 = "cache_api.errors.json_500"
