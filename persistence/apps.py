from django.apps import AppConfig


class PersistenceConfig(AppConfig):
    name = "persistence"
    verbose_name = "Persistence"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from persistence.models import load_json_as_text

        # Every database connection (pooled ones too) loads json columns as their text.
        connection_created.connect(load_json_as_text, dispatch_uid="persistence.load_json_as_text")
