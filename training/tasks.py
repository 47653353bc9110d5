from celery import shared_task

from training import rounds, services


@shared_task(acks_late=True, ignore_result=True)
def reward_model_train_task(reward_model_id: int) -> None:
    services.reward_model_run(reward_model_id=reward_model_id)


@shared_task(ignore_result=True)
def reward_models_reclaim_task() -> None:
    services.reward_models_reclaim()


@shared_task(acks_late=True, ignore_result=True)
def round_run_task(round_id: int) -> None:
    rounds.round_run(round_id=round_id)


@shared_task(ignore_result=True)
def rounds_check_task() -> None:
    rounds.rounds_check()
