"""The operator console: Django's admin, one module per area (autodiscovery imports this one)."""

from ops import admin_deadletters, admin_entries, admin_jobs, admin_ratelimit  # noqa: F401

admin_site_header = "Birb Nest console"
