"""The customers service: Lago's customers API of 2022 on Flask, Marshmallow and SQLite."""
