"""`/admin/deadletters/…`: the dead-letter pages (routed before `admin/`, hence admin_view here)."""

from django.contrib import admin
from django.urls import path

from ops.admin_deadletters import dead_letter_action_view, dead_letter_detail_view, dead_letter_list_view

urlpatterns = [
    path("", admin.site.admin_view(dead_letter_list_view), name="deadletter-list"),
    path("action/", admin.site.admin_view(dead_letter_action_view), name="deadletter-action"),
    path("<int:id>/", admin.site.admin_view(dead_letter_detail_view), name="deadletter-detail"),
]
