"""An index on the key in byte order, for the key listing (``GET /v1/cache?prefix=…``).

The primary key's index sorts by the database's collation, which need not be byte order (and
``LIKE 'p%'`` uses it only under the C collation); the listing's keyset pagination and prefix
bounds are on ``key COLLATE "C"`` and use this one. Built concurrently: a large table stays
writable meanwhile. Not in the model's ``Meta.indexes``: raw SQL only, so the model state (and
``makemigrations``) does not change.
"""

from django.db import migrations


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("persistence", "0003_value_metadata_json_text"),
    ]

    operations = [
        migrations.RunSQL(
            sql='CREATE INDEX CONCURRENTLY IF NOT EXISTS cache_entries_key_c_idx ON cache_entries ((key COLLATE "C"))',
            reverse_sql="DROP INDEX CONCURRENTLY IF EXISTS cache_entries_key_c_idx",
        ),
    ]
