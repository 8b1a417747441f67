from django.apps import AppConfig


class OpsConfig(AppConfig):
    name = "ops"
    verbose_name = "Operations"

    def ready(self) -> None:
        from django.db.models.signals import post_delete, post_save

        from birbnest import checks  # noqa: F401 - registers the system checks
        from ops.access import keyring
        from ops.audit import record_command_action
        from ops.models import ApiKey, RateLimitClient, RateLimitSettings
        from ops.ratelimit.services import publish_on_commit
        from persistence.operator_actions import command_action

        # Every change of the rate-limit settings or client rules, however it is made (services,
        # admin, a plain save()), is published to every API process once its transaction commits.
        for model in (RateLimitSettings, RateLimitClient):
            post_save.connect(publish_on_commit, sender=model, dispatch_uid=f"ratelimit-publish-save-{model.__name__}")
            post_delete.connect(
                publish_on_commit, sender=model, dispatch_uid=f"ratelimit-publish-delete-{model.__name__}"
            )
        # Likewise every change of the API keys.
        post_save.connect(keyring.publish_on_commit, sender=ApiKey, dispatch_uid="access-publish-save")
        post_delete.connect(keyring.publish_on_commit, sender=ApiKey, dispatch_uid="access-publish-delete")
        # persistence's commands (rehydrate, process_dlq, jetstream) cannot import ops: they
        # report what they changed with a signal, and the audit log records it.
        command_action.connect(record_command_action, dispatch_uid="ops-audit-command-action")
