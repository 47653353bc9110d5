"""createlabeler and seed_demo."""

import re

import pytest
from django.contrib.auth import authenticate
from django.core.management import CommandError, call_command
from django.test import RequestFactory

from annotation.models import Comparison, Project
from annotation.selectors import user_can_label

pytestmark = pytest.mark.django_db


def log_in(username, password):
    # django-axes watches every authenticate() and needs the request it came with.
    return authenticate(RequestFactory().post("/accounts/login/"), username=username, password=password)


def test_createlabeler_makes_a_labeler_who_can_log_in():
    call_command("createlabeler", "dana", "--password", "a-long-password")
    user = log_in("dana", "a-long-password")
    assert user is not None and user_can_label(user)
    assert not user.groups.filter(name="admins").exists()


def test_createlabeler_admin_joins_both_groups():
    call_command("createlabeler", "erin", "--password", "a-long-password", "--admin")
    user = log_in("erin", "a-long-password")
    assert set(user.groups.values_list("name", flat=True)) == {"labelers", "admins"}
    assert user.is_staff


def test_createlabeler_refuses_a_short_password():
    with pytest.raises(CommandError, match="--password: This password is too short"):
        call_command("createlabeler", "fay", "--password", "abc")


def test_seed_demo_prints_working_credentials_and_is_idempotent(capsys):
    call_command("seed_demo")
    out = capsys.readouterr().out
    credentials = dict(re.findall(r"^  (\w+)\s+(\S+)\s+\(", out, flags=re.MULTILINE))
    assert set(credentials) == {"admin", "alice", "bob", "carol"}
    for username, password in credentials.items():
        assert log_in(username, password) is not None
    project = Project.objects.get(slug="demo")
    assert Comparison.objects.filter(project=project).count() >= 30
    assert project.guidelines
    call_command("seed_demo")
    assert "0 comparisons added, 100 already there" in capsys.readouterr().out
    assert Comparison.objects.filter(project=project).count() == 100


@pytest.mark.django_db
def test_the_demo_is_set_for_a_round_of_every_algorithm_on_a_cpu():
    from rounds import services
    from rounds.models import Algorithm

    call_command("seed_demo")
    project = Project.objects.get(slug="demo")
    settings_row = services.training_settings(project)
    assert (settings_row.policy, settings_row.reward_overrides["backbone"]) == ("smollm2-135m", "minilm-l6")
    assert settings_row.min_new_comparisons < Comparison.objects.filter(project=project).count()
    for algorithm in Algorithm.values:  # each algorithm's section names only fields it has
        settings_row.algorithm = algorithm
        settings_row.save()
        overrides = services.optimizer_overrides(project)
        assert overrides["max_new_tokens"] == 32, algorithm
