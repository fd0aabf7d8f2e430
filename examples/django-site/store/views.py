"""Store pages: product list with one order form each, order submission, thanks page."""
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from .forms import OrderForm
from .models import Order, Product


def order_form(product, data=None):
    return OrderForm(data, instance=Order(product=product), auto_id=f"id_{product.pk}_%s")


def render_list(request, rejected=None):
    """Render every product with a blank form, or with the rejected form (and its errors) if given."""
    products = list(Product.objects.all())
    for product in products:
        is_rejected = rejected is not None and rejected.instance.product_id == product.pk
        product.form = rejected if is_rejected else order_form(product)
    return render(request, "store/product_list.html", {"products": products})


def product_list(request):
    return render_list(request)


@require_POST
def order(request, product_id):
    form = order_form(get_object_or_404(Product, pk=product_id), request.POST)
    if not form.is_valid():
        return render_list(request, rejected=form)
    return redirect("store:thanks", order_id=form.save().pk)


def thanks(request, order_id):
    placed = get_object_or_404(Order.objects.select_related("product"), pk=order_id)
    return render(request, "store/thanks.html", {"order": placed})
