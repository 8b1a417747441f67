"""The audit log of operator actions; the console's "viewer" and "operator" groups may read it."""

import django.utils.timezone
from django.contrib.auth.management import create_permissions
from django.contrib.contenttypes.management import create_contenttypes
from django.db import migrations, models

GROUPS = ("viewer", "operator")
PERMISSION = "view_auditentry"


def grant_view(apps, schema_editor):
    # Permissions are normally created after all migrations; the groups need this one now.
    apps.get_model("contenttypes", "ContentType").objects.clear_cache()
    ops = apps.get_app_config("ops")
    previous = getattr(ops, "models_module", None)
    ops.models_module = previous or True  # historical app configs have none; these functions skip such apps
    create_contenttypes(ops, apps=apps, verbosity=0)
    create_permissions(ops, apps=apps, verbosity=0)
    ops.models_module = previous
    permission = apps.get_model("auth", "Permission").objects.get(content_type__app_label="ops", codename=PERMISSION)
    for group in apps.get_model("auth", "Group").objects.filter(name__in=GROUPS):
        group.permissions.add(permission)


def revoke_view(apps, schema_editor):
    Permission = apps.get_model("auth", "Permission")
    for group in apps.get_model("auth", "Group").objects.filter(name__in=GROUPS):
        group.permissions.remove(*Permission.objects.filter(content_type__app_label="ops", codename=PERMISSION))


class Migration(migrations.Migration):
    dependencies = [("ops", "0003_api_keys")]  # after 0002, which made the groups

    operations = [
        migrations.CreateModel(
            name="AuditEntry",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("at", models.DateTimeField(db_index=True, default=django.utils.timezone.now)),
                ("actor", models.CharField(db_index=True, max_length=200)),
                ("address", models.CharField(blank=True, max_length=64)),
                (
                    "action",
                    models.CharField(db_index=True, help_text="e.g. entry.edit, deadletter.purge", max_length=64),
                ),
                ("target", models.TextField(blank=True, help_text="what it acted on: a key, ids, a client")),
                ("details", models.JSONField(blank=True, default=dict)),
            ],
            options={
                "verbose_name": "audit entry",
                "verbose_name_plural": "audit log",
                "ordering": ["-at", "-id"],
                "default_permissions": ("view",),
            },
        ),
        migrations.RunPython(grant_view, revoke_view),
    ]
