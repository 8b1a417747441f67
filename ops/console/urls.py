"""The console's own pages, routed before `admin/` (hence ``admin_view`` here):
`/admin/deadletters/…` and `/admin/dashboard/` (its websocket is on `manage.py rundashboard`)."""

from django.contrib import admin
from django.urls import path

from ops.console.dashboard import dashboard_page
from ops.console.deadletters import dead_letter_action_view, dead_letter_detail_view, dead_letter_list_view

deadletter_urlpatterns = [
    path("", admin.site.admin_view(dead_letter_list_view), name="deadletter-list"),
    path("action/", admin.site.admin_view(dead_letter_action_view), name="deadletter-action"),
    path("<int:id>/", admin.site.admin_view(dead_letter_detail_view), name="deadletter-detail"),
]

dashboard_urlpatterns = [
    path("", admin.site.admin_view(dashboard_page), name="dashboard"),
]
