"""API keys replace DRF's authtokens for `/admin/ratelimit`; the console's groups see the keys.

DRF's ``authtoken_token`` table held operator tokens in plain text. They cannot become API keys
(only a keyed hash of a key in Birb Nest's own format is kept), so this migration lists whose
tokens stop working, says how to issue keys instead, and drops the table with its plain-text
secrets (``rest_framework.authtoken`` is no longer installed).
"""

from django.contrib.auth.management import create_permissions
from django.contrib.contenttypes.management import create_contenttypes
from django.db import migrations, models

VIEWER = ["view_apikey"]
OPERATOR = ["view_apikey", "change_apikey"]  # change: revoke (keys are made with manage.py apikey)


def grant(apps, schema_editor):
    apps.get_model("contenttypes", "ContentType").objects.clear_cache()
    ops = apps.get_app_config("ops")
    previous = getattr(ops, "models_module", None)
    ops.models_module = previous or True  # historical app configs have none; these functions skip such apps
    create_contenttypes(ops, apps=apps, verbosity=0)
    create_permissions(ops, apps=apps, verbosity=0)
    ops.models_module = previous
    Permission = apps.get_model("auth", "Permission")
    for group in apps.get_model("auth", "Group").objects.filter(name__in=("viewer", "operator")):
        codenames = VIEWER if group.name == "viewer" else OPERATOR
        group.permissions.add(*Permission.objects.filter(content_type__app_label="ops", codename__in=codenames))


def ungrant(apps, schema_editor):
    Permission = apps.get_model("auth", "Permission")
    for group in apps.get_model("auth", "Group").objects.filter(name__in=("viewer", "operator")):
        group.permissions.remove(*Permission.objects.filter(content_type__app_label="ops", codename__in=OPERATOR))


def retire_drf_tokens(apps, schema_editor):
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regclass('authtoken_token') IS NOT NULL")
        if not cursor.fetchone()[0]:
            return
        user_table = apps.get_model("auth", "User")._meta.db_table
        cursor.execute(
            f"SELECT u.username FROM authtoken_token t JOIN {user_table} u ON u.id = t.user_id ORDER BY u.username"
        )
        users = [row[0] for row in cursor.fetchall()]
        cursor.execute("DROP TABLE authtoken_token")
        cursor.execute("DELETE FROM django_migrations WHERE app = 'authtoken'")
    if users:
        print(
            f"\n  DRF operator tokens removed ({len(users)}: {', '.join(users)}); they no longer work on "
            "/admin/ratelimit.\n  Issue each operator an API key instead:\n"
            "    python manage.py apikey create NAME --scopes admin --owner USERNAME\n"
            "  and send it as 'Authorization: Bearer <key>'."
        )


class Migration(migrations.Migration):
    dependencies = [
        ("ops", "0004_audit_log"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [
        migrations.AlterField(
            model_name="ratelimitclient",
            name="client",
            field=models.CharField(
                help_text="an API key's public id (bn_...) or a client IP address", max_length=255, unique=True
            ),
        ),
        migrations.RunPython(grant, ungrant),
        migrations.RunPython(retire_drf_tokens, migrations.RunPython.noop),
    ]
