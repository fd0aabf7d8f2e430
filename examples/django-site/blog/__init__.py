"""Blog app: dated posts with a list page and a detail page."""
