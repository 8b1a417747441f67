"""WSGI entry point: the REST API is served through WSGI (granian), see README "Serving model"."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "birbnest.settings")

application = get_wsgi_application()
