"""Store app: products and a CSRF-protected order form."""
