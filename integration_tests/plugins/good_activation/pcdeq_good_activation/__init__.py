"""Example pcdeq plugin adding one concave activation (see ``hooks.py``)."""
