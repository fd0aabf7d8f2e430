"""Deploy step of the sample site, run by corral from the app folder before (re)starting workers:
migrate the database, collect static files into static/, seed demo content once."""
import os
from datetime import timedelta
from decimal import Decimal

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")
django.setup()

from django.conf import settings  # noqa: E402  (needs django.setup() first)
from django.core.management import call_command  # noqa: E402
from django.utils import timezone  # noqa: E402

from blog.models import Post  # noqa: E402
from store.models import Product  # noqa: E402

POSTS = [
    ("Hello from corral", "hello-from-corral",
     "This site is the sample application bundled with corral.\n\n"
     "It runs as a WSGI app in worker processes."),
    ("Serving files from disk", "serving-files-from-disk",
     "Stylesheets, images and the admin's static files are sent by the front server, "
     "never by Django."),
    ("Привет, мир", "privet-mir", "A post with a Cyrillic title, to check that UTF-8 text survives every layer."),
]
PRODUCTS = [
    ("Fence post", Decimal("12.50"), "Solid oak, one metre sixty."),
    ("Gate latch", Decimal("7.90"), "Galvanised steel, fits any gate."),
    ("Rope, 20 m", Decimal("19.00"), "Braided hemp for the round pen."),
]


def seed():
    if Post.objects.exists():
        print("seed: blog posts already present, skipped")
    else:
        now = timezone.now()
        Post.objects.bulk_create(
            Post(title=title, slug=slug, body=body, published=now - timedelta(days=len(POSTS) - i))
            for i, (title, slug, body) in enumerate(POSTS)
        )
        print(f"seed: created {len(POSTS)} blog posts")
    if Product.objects.exists():
        print("seed: products already present, skipped")
    else:
        Product.objects.bulk_create(Product(name=n, price=p, description=d) for n, p, d in PRODUCTS)
        print(f"seed: created {len(PRODUCTS)} products")


if __name__ == "__main__":
    db = settings.DATABASES["default"]
    print(f"deploy: database {db['ENGINE'].rsplit('.', 1)[-1]} {db['NAME']}")
    print("deploy: migrate")
    call_command("migrate", interactive=False, verbosity=1)
    print(f"deploy: collectstatic into {settings.STATIC_ROOT}")
    call_command("collectstatic", interactive=False, verbosity=1)
    seed()
    print("deploy: done")
