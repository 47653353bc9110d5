"""Who a token is and which projects they may see, cached for FLYWHEEL_AUTH_CACHE_SECONDS.

Every labeling request used to read the token and its user, the user's groups and the project with
the ORM: three queries whose Python cost was a third of the request's CPU (bench/labeling_load.py).
The answers change rarely, so they are kept in Django's cache, and every change that could alter
one deletes it here, from model signals rather than from the services, so that the admin, the
shell and a QuerySet.delete() of tokens are covered too: a revoked or expired token, a deactivated
user, a changed group or membership takes effect on the next request.

With Redis (REDIS_URL) the cache is shared, so that holds for every process. Without it each
process has its own (LocMemCache), and a change made in one process reaches the others only when
their entry runs out: that is what the short lifetime bounds. A write that sends no signal
(QuerySet.update) is bounded the same way. A cache that cannot be reached is a miss, never an error.
"""

import hashlib
import logging
from typing import Any

from django.conf import settings
from django.contrib.auth.models import Group, User
from django.core.cache import cache
from django.db.models.signals import m2m_changed, post_delete, post_save, pre_save
from redis import RedisError
from rest_framework.authtoken.models import Token

from annotation.models import Project

logger = logging.getLogger(__name__)

# The password hash never goes to the cache: the cached user has it deferred, so that reading it
# (or saving the user) loads it from the database.
USER_FIELDS = [field.attname for field in User._meta.concrete_fields if field.attname != "password"]
PROJECT_FIELDS = [field.attname for field in Project._meta.concrete_fields]
_TOKEN_FIELDS = ["key", "user_id", "created"]


# What a deleted token leaves in place of its entry, for one lifetime. Entries are filled with add(),
# which does not overwrite it: a request that read the token just before it was revoked cannot put it
# back after the revocation. (Other changes delete their entries; such a late fill of theirs lasts at
# most one lifetime.)
_REVOKED = "revoked"


def _get(key: str) -> Any:
    if settings.FLYWHEEL_AUTH_CACHE_SECONDS <= 0:
        return None
    try:
        value = cache.get(key)
    except RedisError as error:
        logger.warning("access cache unreadable, reading the database: %r", error)
        return None
    return None if value == _REVOKED else value


def _set(key: str, value: Any) -> None:
    if settings.FLYWHEEL_AUTH_CACHE_SECONDS <= 0:
        return
    try:
        cache.add(key, value, timeout=settings.FLYWHEEL_AUTH_CACHE_SECONDS)
    except RedisError as error:
        logger.warning("access cache not written: %r", error)


def _delete(keys: list[str], *, revoked: bool = False) -> None:
    if not keys:
        return
    try:
        if revoked:
            cache.set_many(dict.fromkeys(keys, _REVOKED), timeout=max(1, settings.FLYWHEEL_AUTH_CACHE_SECONDS))
        else:
            cache.delete_many(keys)
    except RedisError as error:  # unreadable as well, then; what Redis still holds runs out with its lifetime
        logger.warning("access cache entries not deleted, they expire within %s s: %r",
                       settings.FLYWHEEL_AUTH_CACHE_SECONDS, error)  # fmt: skip


def _token_cache_key(token_key: str) -> str:
    # Hashed: the cache's key names are not a place for credentials.
    return "flywheel:token:" + hashlib.sha256(token_key.encode()).hexdigest()


def _slug_key(slug: str) -> str:
    return f"flywheel:project-slug:{slug}"


def _project_id_key(project_id: int) -> str:
    return f"flywheel:project-id:{project_id}"


def _members_key(project_id: int) -> str:
    return f"flywheel:members:{project_id}"


# --------------------------------------------------------------------------------------------
# Tokens: the token, its user and the user's roles (annotation.selectors)
# --------------------------------------------------------------------------------------------


def token_cached(token_key: str) -> tuple[User, Token, set[str]] | None:
    """The token, its user (password deferred) and the user's roles, when cached."""
    entry = _get(_token_cache_key(token_key))
    if entry is None:
        return None
    user_values, created, roles = entry
    user = User.from_db("default", USER_FIELDS, user_values)
    token = Token.from_db("default", _TOKEN_FIELDS, [token_key, user.pk, created])
    token.user = user
    return user, token, set(roles)


def token_cache_set(token: Token, roles: set[str]) -> None:
    user = token.user
    _set(_token_cache_key(token.key), ([getattr(user, name) for name in USER_FIELDS], token.created, sorted(roles)))


def _forget_tokens_of(user_ids: list[int]) -> None:
    keys = Token.objects.filter(user_id__in=user_ids).values_list("key", flat=True)
    _delete([_token_cache_key(key) for key in keys])


def _on_token_saved(sender: type, instance: Token, **kwargs: Any) -> None:
    _delete([_token_cache_key(instance.key)])


def _on_token_deleted(sender: type, instance: Token, **kwargs: Any) -> None:
    _delete([_token_cache_key(instance.key)], revoked=True)


def _on_user_change(sender: type, instance: User, **kwargs: Any) -> None:
    _forget_tokens_of([instance.pk])


def _on_group_change(sender: type, instance: Group, **kwargs: Any) -> None:
    # A renamed or deleted group changes the roles of everyone in it (a deleted group's memberships go
    # without a signal), and every token is cheaper to list than those users.
    _delete([_token_cache_key(key) for key in Token.objects.values_list("key", flat=True)])


def _on_groups_membership_change(
    sender: type, instance: User | Group, action: str, reverse: bool, pk_set: set[int] | None, **kwargs: Any
) -> None:
    if action not in ("post_add", "post_remove", "pre_clear"):
        return
    if isinstance(instance, User):
        _forget_tokens_of([instance.pk])
    elif action == "pre_clear":  # group.user_set.clear(): the members are known only before
        _forget_tokens_of(list(instance.user_set.values_list("pk", flat=True)))
    else:
        _forget_tokens_of(list(pk_set or ()))


# --------------------------------------------------------------------------------------------
# Projects: the row by slug and by id, and the members of a members-only project
# --------------------------------------------------------------------------------------------


def project_cached(*, slug: str | None = None, project_id: int | None = None) -> Project | None:
    """The project by slug or id; a project that does not exist is not cached."""
    key = _slug_key(slug) if slug is not None else _project_id_key(int(project_id or 0))
    values = _get(key)
    if values is None:
        found = Project.objects.filter(**({"slug": slug} if slug is not None else {"pk": project_id})).first()
        if found is not None:  # under both keys: a claim finds it by slug, the vote's ?next=1 by id
            values = [getattr(found, name) for name in PROJECT_FIELDS]
            _set(_slug_key(found.slug), values)
            _set(_project_id_key(found.pk), values)
        return found
    return Project.from_db("default", PROJECT_FIELDS, values)


def project_member_ids(project: Project) -> frozenset[int]:
    key = _members_key(project.pk)
    members = _get(key)
    if members is None:
        members = frozenset(project.members.values_list("pk", flat=True))
        _set(key, members)
    return members


def _on_project_saving(sender: type, instance: Project, **kwargs: Any) -> None:
    # A renamed slug: the old one must stop finding the project.
    if instance.pk is not None:
        old_slug = Project.objects.filter(pk=instance.pk).values_list("slug", flat=True).first()
        if old_slug is not None:
            _delete([_slug_key(old_slug)])


def _on_project_change(sender: type, instance: Project, **kwargs: Any) -> None:
    _delete([_slug_key(instance.slug), _project_id_key(instance.pk), _members_key(instance.pk)])


def _on_project_members_change(
    sender: type, instance: Project | User, action: str, reverse: bool, pk_set: set[int] | None, **kwargs: Any
) -> None:
    if action not in ("post_add", "post_remove", "pre_clear"):
        return
    if isinstance(instance, Project):
        project_ids = [instance.pk]
    elif action == "pre_clear":  # user.member_projects.clear()
        project_ids = list(instance.member_projects.values_list("pk", flat=True))
    else:
        project_ids = list(pk_set or ())
    _delete([_members_key(pk) for pk in project_ids])


def connect() -> None:
    """AppConfig.ready(): the signals that invalidate the cache."""
    post_save.connect(_on_token_saved, sender=Token, dispatch_uid="access_cache_token_save")
    post_delete.connect(_on_token_deleted, sender=Token, dispatch_uid="access_cache_token_delete")
    post_save.connect(_on_user_change, sender=User, dispatch_uid="access_cache_user_save")
    post_delete.connect(_on_user_change, sender=User, dispatch_uid="access_cache_user_delete")
    post_save.connect(_on_group_change, sender=Group, dispatch_uid="access_cache_group_save")
    post_delete.connect(_on_group_change, sender=Group, dispatch_uid="access_cache_group_delete")
    m2m_changed.connect(_on_groups_membership_change, sender=User.groups.through, dispatch_uid="access_cache_groups")
    pre_save.connect(_on_project_saving, sender=Project, dispatch_uid="access_cache_project_saving")
    post_save.connect(_on_project_change, sender=Project, dispatch_uid="access_cache_project_save")
    post_delete.connect(_on_project_change, sender=Project, dispatch_uid="access_cache_project_delete")
    m2m_changed.connect(_on_project_members_change, sender=Project.members.through, dispatch_uid="access_cache_members")
