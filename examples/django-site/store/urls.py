"""Store URLs: /store/, /store/order/<product id>/ (POST only) and /store/thanks/<order id>/."""
from django.urls import path

from . import views

app_name = "store"
urlpatterns = [
    path("", views.product_list, name="list"),
    path("order/<int:product_id>/", views.order, name="order"),
    path("thanks/<int:order_id>/", views.thanks, name="thanks"),
]
