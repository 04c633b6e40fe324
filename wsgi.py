"""The WSGI entry point: ``gunicorn customers_service.wsgi:app`` (or ``wsgi:app`` from here)."""

from customers_service.app import create_app

app = create_app()
