"""Authentication and per-topic permissions (docs/security.md).

Users live in a TOML file given with ``--auth-file``::

    allow_anonymous = false      # admit v0 clients and v1 clients without AUT?

    [anonymous]                  # what anonymous clients may do (default: nothing)
    publish = []
    subscribe = ["public.*"]

    [users.alice]
    secret = "scrypt$16384$8$1$<salt>$<hash>"   # from `pylogstreams hash-secret`
    publish = ["chat.*", "events"]
    subscribe = ["*"]

Secrets are stored only as scrypt hashes (``hashlib.scrypt``: memory-hard,
salted) and compared in constant time (``hmac.compare_digest``). Patterns
are shell-style (``fnmatch.fnmatchcase``) over topic names.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import fnmatch
import functools
import hashlib
import hmac
import os
import re
import tomllib

__all__ = ["User", "Authenticator", "hash_secret", "check_secret", "ANYONE"]

_N, _R, _P = 1 << 14, 8, 1   # scrypt cost: ~16 MiB and tens of ms per check
_CACHE_MAX = 4096            # verified (user, secret digest) pairs remembered


def hash_secret(secret: str, *, n: int = _N, r: int = _R, p: int = _P) -> str:
    """Encode ``secret`` for the users file: ``scrypt$n$r$p$salt$hash``."""
    salt = os.urandom(16)
    digest = hashlib.scrypt(secret.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return "scrypt$%d$%d$%d$%s$%s" % (n, r, p, b64(salt).decode(), b64(digest).decode())


def check_secret(secret: str | bytes, encoded: str) -> bool:
    """True if ``secret`` matches ``encoded`` (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        if isinstance(secret, str):
            secret = secret.encode("utf-8")
        got = hashlib.scrypt(secret, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(expected), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@dataclasses.dataclass(frozen=True)
class User:
    """A principal and the topic patterns it may publish to and read."""

    name: str
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    secret: str = dataclasses.field(default="", repr=False)

    def may_publish(self, topic: str) -> bool:
        return self._publish_match(topic)

    def may_subscribe(self, topic: str) -> bool:
        return self._subscribe_match(topic)

    # Checked on every PUB: the patterns are compiled once, into one regex
    # (fnmatch's own translation), or a constant when one of them is "*".
    @functools.cached_property
    def _publish_match(self):
        return _matcher(self.publish)

    @functools.cached_property
    def _subscribe_match(self):
        return _matcher(self.subscribe)


def _matcher(patterns: tuple[str, ...]):
    if "*" in patterns:
        return lambda topic: True
    if not patterns:
        return lambda topic: False
    rx = re.compile("|".join("(?:%s)" % fnmatch.translate(p) for p in patterns))
    return lambda topic: rx.match(topic) is not None


# Without an auth file every client may do everything.
ANYONE = User("anyone", ("*",), ("*",))


class Authenticator:
    """The users file, loaded once at start."""

    def __init__(self, users: dict[str, User], allow_anonymous: bool, anonymous: User) -> None:
        self.users = users                      # name -> User
        self.allow_anonymous = allow_anonymous  # admit clients that don't authenticate
        self.anonymous = anonymous              # their permissions
        self._verified: dict[tuple[str, bytes], User] = {}  # cache of good (name, sha256(secret))

    @classmethod
    def load(cls, path: str) -> "Authenticator":
        with open(path, "rb") as f:
            data = tomllib.load(f)
        users = {}
        for name, spec in data.get("users", {}).items():
            secret = spec.get("secret", "")
            if not secret.startswith("scrypt$"):
                raise ValueError("user %r: secret must be a scrypt hash (pylogstreams hash-secret)"
                                 % name)
            users[name] = User(name, tuple(spec.get("publish", ())),
                               tuple(spec.get("subscribe", ())), secret)
        anon = data.get("anonymous", {})
        anonymous = User("anonymous", tuple(anon.get("publish", ())),
                         tuple(anon.get("subscribe", ())))
        return cls(users, bool(data.get("allow_anonymous", False)), anonymous)

    async def verify(self, name: str, secret: bytes) -> User | None:
        """The user if ``secret`` is right; the hash runs off the event loop."""
        key = (name, hashlib.sha256(secret).digest())
        user = self._verified.get(key)
        if user is not None:
            return user
        user = self.users.get(name)
        # An unknown user costs the same hash, so timing doesn't reveal names.
        encoded = user.secret if user is not None else _DUMMY
        ok = await asyncio.get_running_loop().run_in_executor(None, check_secret, secret, encoded)
        if not ok or user is None:
            return None
        if len(self._verified) >= _CACHE_MAX:
            self._verified.clear()
        self._verified[key] = user
        return user


_DUMMY = "scrypt$%d$%d$%d$%s$%s" % (_N, _R, _P, "AAAAAAAAAAAAAAAAAAAAAA==",
                                    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
