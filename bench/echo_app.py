"""The baseline: a bare Flask app whose POST /api/v1/customers returns the parsed body."""

from flask import Flask, request

app = Flask(__name__)


@app.post("/api/v1/customers")
def echo():
    """The parsed body, unvalidated and unstored."""
    return request.get_json()
