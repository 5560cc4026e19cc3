"""The model page and playground: static assets (static/) and one router (routes.py)."""
