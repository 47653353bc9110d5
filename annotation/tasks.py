from celery import shared_task

from annotation import ai_labeling, services


@shared_task(name=services.AGREEMENT_REFRESH_TASK, acks_late=True, ignore_result=True)
def agreement_refresh_task(project_id: int) -> None:
    services.agreement_refresh(project_id=project_id)
    services.agreement_refreshed.send(sender=None, project_id=project_id)


@shared_task(ignore_result=True)
def agreement_catch_up_task() -> None:
    services.agreement_catch_up()


@shared_task(ignore_result=True)
def ai_label_task(run_id: int) -> None:
    ai_labeling.ai_run(run_id=run_id)
