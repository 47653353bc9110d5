from django.apps import AppConfig


class RoundsConfig(AppConfig):
    name = "rounds"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from annotation.services import agreement_refreshed
        from rounds.services import round_after_refresh

        agreement_refreshed.connect(round_after_refresh, dispatch_uid="rounds.after_refresh")
