"""The operator console's admin pages (autodiscovery imports this module): one module per area,
in ``ops/console/`` and ``ops/ratelimit/``."""

from django.contrib import admin

from ops.access import admin as access_admin  # noqa: F401 - they register their pages
from ops.console import audit_admin, deadletters, entries, jobs_admin  # noqa: F401
from ops.ratelimit import admin as ratelimit_admin  # noqa: F401

admin.site.site_header = "Birb Nest console"
admin.site.site_title = "Birb Nest"
admin.site.index_title = "Operations"
