"""The order form shown under each product (the product comes from the URL)."""
from django import forms

from .models import Order


class OrderForm(forms.ModelForm):
    class Meta:
        model = Order
        fields = ["quantity", "email"]
        widgets = {"quantity": forms.NumberInput(attrs={"min": 1, "max": 99})}

    def clean_quantity(self):
        quantity = self.cleaned_data["quantity"]
        if not 1 <= quantity <= 99:
            raise forms.ValidationError("Order between 1 and 99 items.")
        return quantity
