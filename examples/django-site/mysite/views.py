"""Site-level pages: the home page and the route report used to test non-ASCII paths."""
from django.shortcuts import render


def home(request):
    return render(request, "home.html")


def route_info(request):
    match = request.resolver_match
    return render(request, "route.html", {"route": match.route, "url_name": match.url_name})
