"""Where Redis is and how to reach it: `REDIS_URL` parsed once, for the one client (`redis_client.py`).

The URL forms are redis-py's, so a URL that works with redis-py (or `redis-cli -u`) works here:

- `redis://[[user]:password@]host[:port][/db]`: TCP; `user:password` is an ACL login (`AUTH user password`),
  `:password` the classic one (`AUTH password`).
- `rediss://...`: TLS, with redis-py's query parameters `ssl_ca_certs` (a PEM bundle; the system's CAs
  without it), `ssl_certfile` and `ssl_keyfile` (a client certificate, for `tls-auth-clients yes`),
  `ssl_cert_reqs` (`required`, the default; `optional`; `none`) and `ssl_check_hostname` (true by default
  when the certificate is required).
- `unix:///run/redis/redis.sock[?db=N]`: a unix socket (password and user as for TCP).

`db` may also be given as a query parameter. Any other query parameter is refused by name, rather than
ignored: a typo in `ssl_ca_certs` must not turn into a silently unverified connection.

Secrets: the password is only ever sent in AUTH. `RedisAddress` hides it from `repr`, `redacted()` prints
`***`, and no error raised here contains it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["DEFAULT_PORT", "RedisAddress", "TlsOptions"]

DEFAULT_PORT: Final = 6379
_CERT_REQS: Final = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})
_TLS_PARAMETERS: Final = frozenset(
    {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)

Scheme = Literal["redis", "rediss", "unix"]


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """The `rediss://` query parameters; `context()` builds the `ssl.SSLContext` they describe."""

    ca_certs: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    cert_reqs: Literal["none", "optional", "required"] = "required"
    check_hostname: bool = True

    def context(self) -> ssl.SSLContext:
        """A client context: the CA bundle (or the system's), the client certificate if any. Raises
        ValueError, naming the files, when one is missing or unusable."""
        try:
            context = ssl.create_default_context(cafile=self.ca_certs)
            context.check_hostname = self.check_hostname and self.cert_reqs == "required"
            context.verify_mode = _CERT_REQS[self.cert_reqs]
            if self.certfile is not None:
                context.load_cert_chain(self.certfile, self.keyfile)
        except (OSError, ssl.SSLError) as error:
            files = [name for name in (self.ca_certs, self.certfile, self.keyfile) if name is not None]
            raise ValueError(f"the TLS files {files} of the Redis URL are unusable: {error}") from error
        return context


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """A parsed `REDIS_URL` (module docstring). `host`/`port` for TCP and TLS, `path` for a unix socket."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    scheme: Scheme = "redis"
    path: str | None = None
    tls: TlsOptions | None = None
    #: `host:port`, or the socket's path: which server, without the login (the client's pool key).
    node: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "node", self.path if self.path is not None else f"{host}:{self.port}")

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """Raises ValueError (whose message never contains the password) for anything else."""
        parts = urlsplit(url)
        redacted = _redact(url)
        scheme = parts.scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"a redis://, rediss:// or unix:// URL is needed, got {redacted!r}")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError(f"bad port in {redacted!r}") from None
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        db_text = query.pop("db", None)
        path = parts.path
        if scheme != "unix":
            if db_text is None and path.strip("/"):
                db_text = path.strip("/")
            path = ""
        elif not path:
            raise ValueError(f"a unix:// URL needs the socket's path, got {redacted!r}")
        if db_text is not None and not db_text.isdigit():
            raise ValueError(f"the database of {redacted!r} must be a number")
        tls_query = {name: query.pop(name) for name in _TLS_PARAMETERS & query.keys()}
        if query:
            # Only names that look like parameters are echoed: a password holding an unencoded `?` puts its
            # tail here, and this message may reach a log.
            named = sorted(name for name in query if name.replace("_", "").isalnum() and name.isascii())
            escape = "in a password, write ? # @ / : as %3F %23 %40 %2F %3A"
            hint = "" if len(named) == len(query) else f" ({escape})"
            raise ValueError(f"unknown query parameters {named or ''}{hint}".rstrip())
        if tls_query and scheme != "rediss":
            raise ValueError(f"{sorted(tls_query)} need a rediss:// URL, got {redacted!r}")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=int(db_text) if db_text else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            scheme=scheme,  # type: ignore[arg-type]  # checked above
            path=unquote(path) or None,
            tls=_tls_options(tls_query, redacted) if scheme == "rediss" else None,
        )

    def at(self, host: str, port: int) -> RedisAddress:
        """The same login and TLS options on another node (a Redis Cluster redirection)."""
        return RedisAddress(host, port, self.db, self.username, self.password, self.scheme, None, self.tls)

    def redacted(self) -> str:
        """The URL with the password replaced by `***`: what logs and errors may show."""
        user = self.username or ""
        login = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        if self.path is not None:
            return f"unix://{login}{self.path}?db={self.db}"
        return f"{self.scheme}://{login}{self.node}/{self.db}"


def _tls_options(query: dict[str, str], redacted: str) -> TlsOptions:
    cert_reqs = query.get("ssl_cert_reqs", "required").lower().removeprefix("cert_")
    if cert_reqs not in _CERT_REQS:
        raise ValueError(f"ssl_cert_reqs must be none, optional or required in {redacted!r}")
    check = query.get("ssl_check_hostname", "true").lower()
    if check not in _TRUE | _FALSE:
        raise ValueError(f"ssl_check_hostname must be true or false in {redacted!r}")
    return TlsOptions(
        ca_certs=query.get("ssl_ca_certs") or None,
        certfile=query.get("ssl_certfile") or None,
        keyfile=query.get("ssl_keyfile") or None,
        cert_reqs=cert_reqs,  # type: ignore[arg-type]  # checked above
        check_hostname=check in _TRUE,
    )


def _redact(url: str) -> str:
    """The URL without its password and without the values of its query (which could hold one)."""
    parts = urlsplit(url)
    names = "&".join(name for name, _ in parse_qsl(parts.query, keep_blank_values=True))
    if parts.password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    return parts._replace(query=names, fragment="").geturl()
