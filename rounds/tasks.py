from celery import shared_task

from rounds import reward_models, services


@shared_task(acks_late=True, ignore_result=True)
def reward_model_train_task(reward_model_id: int) -> None:
    reward_models.reward_model_run(reward_model_id=reward_model_id)


@shared_task(ignore_result=True)
def reward_models_reclaim_task() -> None:
    reward_models.reward_models_reclaim()


@shared_task(acks_late=True, ignore_result=True)
def round_run_task(round_id: int) -> None:
    services.round_run(round_id=round_id)


@shared_task(ignore_result=True)
def rounds_check_task() -> None:
    services.rounds_check()
