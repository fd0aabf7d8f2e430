"""Blog pages: the list of published posts and one post."""
from django.shortcuts import get_object_or_404, render
from django.utils import timezone

from .models import Post


def post_list(request):
    posts = Post.objects.filter(published__lte=timezone.now())
    return render(request, "blog/post_list.html", {"posts": posts})


def post_detail(request, slug):
    post = get_object_or_404(Post, slug=slug, published__lte=timezone.now())
    return render(request, "blog/post_detail.html", {"post": post})
