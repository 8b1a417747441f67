"""`/admin/dashboard/`: the live dashboard page (its websocket is on `manage.py rundashboard`)."""

from django.contrib import admin
from django.urls import path

from ops.dashboard import dashboard_page

urlpatterns = [
    path("", admin.site.admin_view(dashboard_page), name="dashboard"),
]
