"""Negative example: a pcdeq plugin offering a convex activation (see ``hooks.py``)."""
