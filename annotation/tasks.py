from celery import shared_task

from annotation import services


@shared_task(name=services.AGREEMENT_REFRESH_TASK, acks_late=True, ignore_result=True)
def agreement_refresh_task(project_id: int) -> None:
    services.agreement_refresh(project_id=project_id)


@shared_task(ignore_result=True)
def agreement_catch_up_task() -> None:
    services.agreement_catch_up()
