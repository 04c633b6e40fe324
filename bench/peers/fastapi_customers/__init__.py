"""The benchmark's peer: the customers API's upsert, GET one and list page 1, written as most
teams would, with FastAPI, Pydantic v2 and SQLAlchemy 2.0 (see bench/README.md)."""
