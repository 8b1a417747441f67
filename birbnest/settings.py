"""Django settings for Birb Nest.

Every value that an operator can change comes from :mod:`birbnest.env` (one typed reader, one
error line, exit code 2). Variables that are unset are filled first from ``.env`` and then from
``<BIRB_DATA_DIR>/stack.env``, the file `make run` writes with the URLs of the servers it started.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import dj_database_url

from birbnest.env import BASE_DIR, DEV_SECRET_KEY, exit_on_config_error, load_config, load_env_files

load_env_files()
with exit_on_config_error():
    BIRB = load_config()

VERSION = "0.1.0"
SERVICE_NAME = "birb-nest"

DEBUG = BIRB.debug
# DEBUG without a SECRET_KEY is allowed (load_config refuses it otherwise); use a fixed dev value.
SECRET_KEY = BIRB.secret_key or DEV_SECRET_KEY
ALLOWED_HOSTS = list(BIRB.allowed_hosts)

# Production behind a TLS proxy (docs/OPERATIONS.md, "Production settings"): `manage.py check
# --deploy` is clean with HTTPS_ONLY, TRUST_X_FORWARDED_PROTO and ALLOWED_HOSTS set. The API
# speaks plain HTTP itself, so the proxy's X-Forwarded-Proto is what tells an HTTPS request.
if BIRB.trust_x_forwarded_proto:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
CSRF_TRUSTED_ORIGINS = list(BIRB.csrf_trusted_origins)
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = BIRB.https_only
SECURE_SSL_REDIRECT = BIRB.https_only
# Probes call these over plain HTTP on loopback (compose's healthcheck, a scraper beside the
# process): they answer there too, and reveal no data (the Prometheus text can ask for a token).
SECURE_REDIRECT_EXEMPT = [r"^$", r"^health$", r"^metrics$", r"^metrics/prometheus$"]
SECURE_HSTS_SECONDS = BIRB.hsts_seconds if BIRB.https_only else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = BIRB.hsts_include_subdomains
# Preload (security.W021) puts a whole registrable domain into the browsers' built-in list; only
# that domain's owner can ask for it (hstspreload.org), not a service on one of its host names.
SECURE_HSTS_PRELOAD = False
SILENCED_SYSTEM_CHECKS = ["security.W021"]

INSTALLED_APPS = [
    # Ours first: Channels also ships a `runworker` command; the first app wins the name.
    "persistence",
    "cache_api",
    "ops",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    # The OpenAPI document (/v1/schema/) and Swagger UI's files from our own static files (offline).
    "drf_spectacular",
    "drf_spectacular_sidecar",
    # Login throttling of the console (django-axes): failed attempts and lockouts, in the admin.
    "axes",
    # After `persistence`: Channels ships a `runworker` too; ours must win (tests check it).
    "channels",
]

MIDDLEWARE = [
    # Counts and times every request (cheap: a few multiprocess-safe counters).
    "birbnest.metrics.metrics_middleware",
    # API keys on /v1/ (API_AUTH), checked in process; the limiter then counts the verified key.
    "ops.access.middleware.access_middleware",
    # Before anything else that costs: a limited client is answered at once.
    "ops.ratelimit.middleware.ratelimit_middleware",
    "django.middleware.security.SecurityMiddleware",
    # The admin's CSS/JS straight from the installed apps (no collectstatic step, no DEBUG).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: answers a locked-out login attempt (429) before it is tried.
    "axes.middleware.AxesMiddleware",
]
# What `/v1/` runs instead (birbnest/wsgi.py): the API does not use sessions, CSRF, users,
# messages or static files. Plain callables only (no process_view hooks).
DATA_PLANE_MIDDLEWARE = [
    "birbnest.metrics.metrics_middleware",
    "ops.access.middleware.access_middleware",
    "ops.ratelimit.middleware.ratelimit_middleware",
    "django.middleware.security.SecurityMiddleware",
]

ROOT_URLCONF = "birbnest.urls"
APPEND_SLASH = False

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "birbnest.wsgi.application"
# The live dashboard's websocket runs on its own ASGI server (manage.py rundashboard, port
# DASHBOARD_PORT); the REST API stays on WSGI (see README "Serving model").
ASGI_APPLICATION = "birbnest.asgi.application"

# An unset URL keeps settings importable (the test suite points them at its own servers after
# start-up); the system check birbnest.E001 stops every command that would need it.
_UNSET_DATABASE_URL = "postgresql://unset@127.0.0.1:1/birbnest"
DATABASES = {
    "default": {
        **dj_database_url.parse(BIRB.database_url or _UNSET_DATABASE_URL),
        # psycopg's pool: request threads borrow a connection instead of each keeping one.
        "CONN_MAX_AGE": 0,
        # With the pool, this makes psycopg check a connection before handing it out, so one
        # broken by a server restart is replaced instead of failing a request.
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": {
            "pool": {"min_size": 1, "max_size": 20, "timeout": 2.0},
            "connect_timeout": 3,
        },
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# django-redis also gives the service its Redis connection pool (persistence.redis_store.client).
# On a Redis Cluster it cannot (it has no cluster client): the service uses redis-py's
# RedisCluster itself, and Django's cache, which nothing of the service uses (sessions and
# django-axes keep their state in PostgreSQL), is each process's own memory.
CACHES: dict[str, dict[str, Any]]
if BIRB.redis_cluster:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.locmem.LocMemCache",
            "KEY_PREFIX": BIRB.redis_key_prefix + "django",
        }
    }
else:
    CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": BIRB.redis_url or "redis://127.0.0.1:1/0",
            "KEY_PREFIX": BIRB.redis_key_prefix + "django",
            "OPTIONS": {
                "CLIENT_CLASS": "django_redis.client.DefaultClient",
                "SOCKET_CONNECT_TIMEOUT": 2,
                "SOCKET_TIMEOUT": 2,
                "CONNECTION_POOL_KWARGS": {"max_connections": 256, "health_check_interval": 30},
            },
        }
    }

# The console's login is throttled (django-axes): after AXES_FAILURE_LIMIT wrong passwords for one
# username, or from one address (REMOTE_ADDR; forwarded-for headers are not trusted), further
# attempts are refused with 429 for AXES_COOLOFF_TIME, or until an operator resets them in the
# admin ("Access attempts") or with `manage.py axes_reset`. A success clears the user's count.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = 5
AXES_COOLOFF_TIME = timedelta(minutes=15)
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
AXES_RESET_ON_SUCCESS = True

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
# The admin's files are served by WhiteNoise straight from the installed apps (finders): there is
# no collectstatic step, so no STATIC_ROOT (one that does not exist only makes WhiteNoise warn
# at every start).
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = False

# The API parses and renders JSON itself (orjson); DRF's own machinery stays out of the hot path.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "DEFAULT_RENDERER_CLASSES": ["cache_api.renderers.OrjsonRenderer"],
    "DEFAULT_PARSER_CLASSES": [],
    "EXCEPTION_HANDLER": "cache_api.errors.exception_handler",
    "UNAUTHENTICATED_USER": None,
    # drf-spectacular describes the views; the data plane's hand-parsed bodies are declared in
    # cache_api/openapi.py, the service routes in ops/openapi.py.
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# The OpenAPI 3 document served at /v1/schema/ (README "OpenAPI"; `manage.py spectacular --validate`).
SPECTACULAR_SETTINGS = {
    "TITLE": "Birb Nest",
    "DESCRIPTION": (
        "A persistent JSON cache: reads from Redis, every write made durable through NATS JetStream "
        "and stored in PostgreSQL by a worker. Errors always have the body "
        '`{"error": "<message>", "code": "<CODE>", "details": ...}`.'
    ),
    "VERSION": VERSION,
    # Relative: the service that serves the document (Swagger UI's "Try it out" calls it).
    "SERVERS": [{"url": "/", "description": "this service"}],
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/v1",
    "SECURITY": [{"bearerAuth": []}, {"apiKeyHeader": []}],
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "cache_api.openapi.postprocess_schema",
        "ops.openapi.postprocess_schema",
    ],
    # Swagger UI's JS, CSS and icon from our own static files (drf-spectacular-sidecar): no CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "persistAuthorization": True, "displayOperationId": False},
}

# A request body may hold a value of MAX_VALUE_SIZE plus the envelope around it.
DATA_UPLOAD_MAX_MEMORY_SIZE = BIRB.max_value_size + 64 * 1024

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {"()": "birbnest.logging.JsonFormatter"},
        "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": BIRB.log_format}},
    "root": {"handlers": ["console"], "level": BIRB.log_level.upper()},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "nats": {"level": "WARNING"},
        "httpx": {"level": "WARNING"},
        "axes.apps": {"level": "WARNING"},  # not a line at every command's start
    },
}
