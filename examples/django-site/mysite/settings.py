"""Production-style settings for the sample site; behaviour is tuned through SAMPLE_* env vars.
See README.md for the list of variables."""
import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent  # the app folder (holds manage.py)

DEBUG = os.environ.get("SAMPLE_DEBUG") == "1"
SECRET_KEY = os.environ.get(
    "DJANGO_SECRET_KEY",
    "sample-site-secret-key-NOT-SECRET-set-DJANGO_SECRET_KEY-in-production-7f3a9c",
)
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]", "testserver"] + [
    host.strip() for host in os.environ.get("SAMPLE_ALLOWED_HOSTS", "").split(",") if host.strip()
]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "blog",
    "store",
    "bench",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "mysite.urls"
WSGI_APPLICATION = "mysite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "mysite" / "templates"],
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

# Database: SQLite by default; SAMPLE_DB=mariadb or SAMPLE_DB=postgresql for a server.
DB_KIND = os.environ.get("SAMPLE_DB", "sqlite")
if DB_KIND == "sqlite":
    DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": BASE_DIR / "db.sqlite3"}}
elif DB_KIND in ("mariadb", "postgresql"):
    if DB_KIND == "mariadb":
        import pymysql  # pure-Python driver standing in for mysqlclient

        pymysql.install_as_MySQLdb()
        if pymysql.version_info < (1, 4, 3):  # Django's minimum mysqlclient version
            pymysql.version_info = (1, 4, 3, "final", 0)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends." + ("mysql" if DB_KIND == "mariadb" else "postgresql"),
            "NAME": os.environ.get("SAMPLE_DB_NAME", "test"),
            "USER": os.environ.get("SAMPLE_DB_USER", "root"),
            "PASSWORD": os.environ.get("SAMPLE_DB_PASSWORD", ""),
            "HOST": os.environ.get("SAMPLE_DB_HOST", "127.0.0.1"),
            "PORT": os.environ.get("SAMPLE_DB_PORT", "3306" if DB_KIND == "mariadb" else "5432"),
            "CONN_MAX_AGE": 60,  # persistent connections, as in production
            "CONN_HEALTH_CHECKS": True,
            "OPTIONS": {"charset": "utf8mb4"} if DB_KIND == "mariadb" else {},
        }
    }
else:
    raise ImproperlyConfigured(f"SAMPLE_DB must be sqlite, mariadb or postgresql, not {DB_KIND!r}")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# Both folders are served by the front server (see corral.toml), not by Django.
STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "static"
MEDIA_URL = "/media/"
MEDIA_ROOT = BASE_DIR / "mysite" / "media"

# Errors (with tracebacks) go to stderr, which the server collects into its log.
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {
        "console": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr", "formatter": "plain"}
    },
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {
        "django": {"handlers": ["console"], "level": "INFO" if DEBUG else "WARNING", "propagate": False},
    },
}
