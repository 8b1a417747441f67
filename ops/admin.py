"""The operator console: Django's admin, one module per area (autodiscovery imports this one)."""

from django.contrib import admin

from ops import admin_deadletters, admin_entries, admin_jobs, admin_ratelimit  # noqa: F401

admin.site.site_header = "Birb Nest console"
admin.site.site_title = "Birb Nest"
admin.site.index_title = "Operations"
