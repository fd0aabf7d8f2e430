"""Root URL map: home page, the three apps, the admin and a non-ASCII (Cyrillic) route."""
from django.contrib import admin
from django.urls import include, path

from . import views

urlpatterns = [
    path("", views.home, name="home"),
    path("blog/", include("blog.urls")),
    path("store/", include("store.urls")),
    path("bench/", include("bench.urls")),
    path("admin/", admin.site.urls),
    path("тест/", views.route_info, name="cyrillic"),
]
