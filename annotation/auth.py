"""API tokens that expire and are revoked, and the answer to a locked-out login (django-axes)."""

from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, User
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import AuthenticationFailed

from annotation import access_cache, selectors


def token_lifetime() -> timedelta:
    return timedelta(hours=settings.FLYWHEEL_TOKEN_LIFETIME_HOURS)


def token_is_expired(token: Token) -> bool:
    return token.created <= timezone.now() - token_lifetime()


def token_issue(*, user: User) -> Token:
    """The user's token; an expired one is replaced, so that logging in again is how a token is renewed."""
    token, _ = Token.objects.get_or_create(user=user)
    if token_is_expired(token):
        token.delete()
        token = Token.objects.create(user=user)
    return token


def token_revoke(*, user: User) -> None:
    Token.objects.filter(user=user).delete()


class ExpiringTokenAuthentication(TokenAuthentication):
    """DRF's token authentication, refusing a token older than FLYWHEEL_TOKEN_LIFETIME_HOURS. The token,
    its user and the user's roles come from the access cache when it has them (annotation/access_cache.py
    says how a change reaches it); the expiry is checked on every request all the same."""

    def authenticate_credentials(self, key: str) -> tuple[AbstractBaseUser, Token]:
        cached = access_cache.token_cached(key)
        if cached is None:
            user, token = super().authenticate_credentials(key)
            roles = selectors.user_roles(user)
            if not token_is_expired(token):
                access_cache.token_cache_set(token, roles)
        else:
            user, token, roles = cached
            selectors.roles_known(user, roles)
            if not user.is_active:  # as DRF answers; a deactivation deletes the entry, this is the TTL's window
                raise AuthenticationFailed("User inactive or deleted.")
        if token_is_expired(token):
            raise AuthenticationFailed("Token has expired; request a new one from /api/v1/auth/token/.")
        return user, token


class RevokeTokensOnPasswordChange:
    """Listed in AUTH_PASSWORD_VALIDATORS only for its `password_changed` hook: Django calls it from
    `User.save()` after every `set_password()`, whichever path set it (the password-change page, the
    admin, `changepassword`, `createlabeler`), so a stolen token dies with the old password. It validates
    nothing."""

    def validate(self, password: str, user: AbstractBaseUser | None = None) -> None:
        return None

    def password_changed(self, password: str, user: AbstractBaseUser | None = None) -> None:
        if isinstance(user, User) and user.pk is not None:
            token_revoke(user=user)

    def get_help_text(self) -> str:
        return ""


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: dict | None = None
) -> HttpResponse:
    """AXES_LOCKOUT_CALLABLE: JSON with Retry-After for the API, the lock-out page for the browser."""
    retry_after = settings.AXES_COOLOFF_TIME
    seconds = int(retry_after.total_seconds())
    message = (
        f"Too many failed logins for this user or address: locked out for {seconds // 60} minutes after the"
        " last failed attempt."
    )
    if request.path.startswith("/api/"):
        response: HttpResponse = JsonResponse({"detail": message, "retry_after_seconds": seconds}, status=429)
    else:
        response = render(request, "registration/lockout.html", {"message": message}, status=429)
    response["Retry-After"] = str(seconds)
    return response
