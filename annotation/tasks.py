from celery import shared_task

from annotation import quality


@shared_task(acks_late=True, ignore_result=True)
def agreement_refresh_task(project_id: int) -> None:
    quality.agreement_refresh(project_id=project_id)
