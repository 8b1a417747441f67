"""The console's two groups: "viewer" (read-only) and "operator" (may change things)."""

from django.contrib.auth.management import create_permissions
from django.contrib.contenttypes.management import create_contenttypes
from django.db import migrations

VIEWER = [
    ("persistence", "view_cacheentry"),
    ("ops", "view_deadletter"),
    ("ops", "view_ratelimitsettings"),
    ("ops", "view_ratelimitclient"),
    ("ops", "view_rehydrationjob"),
    ("ops", "view_dashboard"),
]
OPERATOR = [
    *VIEWER,
    ("persistence", "change_cacheentry"),
    ("persistence", "delete_cacheentry"),
    ("persistence", "rehydrate_cacheentry"),
    ("persistence", "evict_cacheentry"),
    ("ops", "retry_deadletter"),
    ("ops", "purge_deadletter"),
    ("ops", "change_ratelimitsettings"),
    ("ops", "add_ratelimitclient"),
    ("ops", "change_ratelimitclient"),
    ("ops", "delete_ratelimitclient"),
    ("ops", "add_rehydrationjob"),
    ("ops", "run_rehydrationjob"),
]


def create_groups(apps, schema_editor):
    # Permissions are normally created after all migrations; the groups need them now. (The
    # content-type cache may name rows a test flush removed: start from the table.)
    apps.get_model("contenttypes", "ContentType").objects.clear_cache()
    for app_config in apps.get_app_configs():
        # Historical app configs have no models module; these functions skip such apps.
        previous = getattr(app_config, "models_module", None)
        app_config.models_module = previous or True
        create_contenttypes(app_config, apps=apps, verbosity=0)
        create_permissions(app_config, apps=apps, verbosity=0)
        app_config.models_module = previous
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    for name, perms in (("viewer", VIEWER), ("operator", OPERATOR)):
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set(
            [Permission.objects.get(content_type__app_label=app, codename=codename) for app, codename in perms]
        )


def remove_groups(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name__in=["viewer", "operator"]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("ops", "0001_initial"),
        ("persistence", "0002_alter_cacheentry_options"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_groups, remove_groups)]
