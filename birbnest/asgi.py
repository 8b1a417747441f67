"""ASGI entry point: only the live dashboard's websocket (manage.py rundashboard).

The REST API is served through WSGI (granian): Django under ASGI is several times slower on
these machines (README "Serving model"). Placeholder until the dashboard lands.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "birbnest.settings")

application = get_asgi_application()
