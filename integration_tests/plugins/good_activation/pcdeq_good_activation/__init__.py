"""Example pcdeq plugin adding one concave activation and a cell using it (see ``hooks.py``)."""
