"""The storage backends, a family: backends/sqlite and backends/postgres each hold their schema
and migrations, connections, customers SQL and events SQL, and implement storage.Backend;
backends/shared.py holds what they share. Neither imports the other: storage.load_backend
imports the one the settings name."""
