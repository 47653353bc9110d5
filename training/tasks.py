from celery import shared_task

from training import services


@shared_task(acks_late=True, ignore_result=True)
def reward_model_train_task(reward_model_id: int) -> None:
    services.reward_model_run(reward_model_id=reward_model_id)


@shared_task(ignore_result=True)
def reward_models_reclaim_task() -> None:
    services.reward_models_reclaim()
