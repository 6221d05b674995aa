"""Who may read what the Space stored: the feedback export and the History tab are for administrators.

Two ways to be one, both configured by the Space's owner and both off by default (then nobody can
export or see the history through the app):

* on a Hugging Face Space: sign in with Hugging Face (``gr.LoginButton``; the Space's README enables
  OAuth) as one of the user names in the ``CXR_ADMINS`` variable (comma-separated). The login button
  is only shown on a Space: elsewhere Gradio mocks the login with the machine's own Hugging Face
  account, which would make every visitor that user.
* anywhere (local runs, scripts): the ``CXR_ADMIN_TOKEN`` secret, typed into the History tab or sent
  by API clients as the ``X-CXR-Admin-Token`` header (``gradio_client.Client(url, headers={...})``).

Hiding an endpoint from the API page does not protect it (Gradio still runs it when called by
name), so every handler that returns stored data checks :meth:`AccessPolicy.is_admin` itself.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field

TOKEN_HEADER = "x-cxr-admin-token"


class AccessDenied(PermissionError):
    """The caller is not an administrator; ``str()`` says how to become one."""


@dataclass(frozen=True)
class AccessPolicy:
    admin_token: str | None = None
    admins: frozenset[str] = field(default_factory=frozenset)
    on_space: bool = False

    @classmethod
    def from_env(cls) -> "AccessPolicy":
        env = os.environ
        names = frozenset(n.strip().lower() for n in (env.get("CXR_ADMINS") or "").split(",") if n.strip())
        # Real "Sign in with Hugging Face" only on a Hugging Face Space with OAuth enabled; anywhere else
        # Gradio mocks the login with the machine's own account, which would make every visitor that user.
        on_space = bool(env.get("SPACE_ID")) and env.get("SYSTEM") == "spaces" and bool(env.get("OAUTH_CLIENT_ID"))
        return cls(admin_token=env.get("CXR_ADMIN_TOKEN") or None, admins=names, on_space=on_space)

    @property
    def oauth(self) -> bool:
        """Sign-in with Hugging Face is offered (on a Space with an allow-list)."""
        return self.on_space and bool(self.admins)

    @property
    def enabled(self) -> bool:
        return bool(self.admin_token) or self.oauth

    def is_admin(self, *, token: str | None = None, username: str | None = None) -> bool:
        if self.admin_token and token and hmac.compare_digest(token.encode(), self.admin_token.encode()):
            return True
        return bool(self.oauth and username and username.lower() in self.admins)

    def require(self, *, token: str | None = None, username: str | None = None) -> None:
        if self.is_admin(token=token, username=username):
            return
        if not self.enabled:
            raise AccessDenied("The feedback export and the history are disabled: the Space's owner has set no "
                               "administrator (CXR_ADMIN_TOKEN, or CXR_ADMINS on a Hugging Face Space).")
        how = []
        if self.oauth:
            how.append("sign in with Hugging Face as an administrator")
        if self.admin_token:
            how.append("give the administrator token (the X-CXR-Admin-Token header for API clients)")
        raise AccessDenied("Administrators only: " + " or ".join(how) + ".")


def request_token(request) -> str | None:
    """The admin token an API client sent as a header (``gr.Request``), if any."""
    headers = getattr(request, "headers", None)
    if headers is None:
        return None
    return headers.get(TOKEN_HEADER) or None
