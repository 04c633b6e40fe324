"""Helpers the tests import: the service as a client drives it, its servers, databases, a
PostgreSQL cluster, a webhook receiver, load and small filesystems. Fixtures stay in conftest."""
