"""The web worklist, study viewer, admin pages and JSON API (FastAPI + Jinja2)."""
