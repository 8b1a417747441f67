"""``value`` and ``metadata`` become ``json`` columns: PostgreSQL keeps the text it is given.

``jsonb`` rewrote numbers (``1e20`` -> ``100000000000000000000``, ``-0.0`` -> ``0``) and reordered
object keys, so a read-through served another text than the API had written, and integers
beyond 64 bits could not be encoded again at all. Rows written before this migration keep the
text ``jsonb`` made of them. One ``ALTER TABLE`` rewrites the table once (under an exclusive
lock: the worker's writes wait, JetStream keeps them meanwhile).
"""

from django.db import migrations

import persistence.models

TO_JSON = (
    "ALTER TABLE cache_entries"
    " ALTER COLUMN value TYPE json USING value::json,"
    " ALTER COLUMN metadata TYPE json USING metadata::json"
)
TO_JSONB = (
    "ALTER TABLE cache_entries"
    " ALTER COLUMN value TYPE jsonb USING value::jsonb,"
    " ALTER COLUMN metadata TYPE jsonb USING metadata::jsonb"
)


class Migration(migrations.Migration):
    dependencies = [
        ("persistence", "0002_alter_cacheentry_options"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunSQL(TO_JSON, reverse_sql=TO_JSONB)],
            state_operations=[
                migrations.AlterField(
                    model_name="cacheentry",
                    name="metadata",
                    field=persistence.models.JSONTextField(default=dict),
                ),
                migrations.AlterField(
                    model_name="cacheentry",
                    name="value",
                    field=persistence.models.JSONTextField(null=True),
                ),
            ],
        ),
    ]
