"""Keeping secrets secret: which headers hold one, header values taken from the environment,
and redaction of every text batcher repeats (messages, raw bodies, the resume command).
Pure functions, tested without a server."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping, Sequence
from urllib.parse import urlsplit

from batcher.errors import ConfigError

MASK = "***"
_SECRET_NAME = re.compile(r"key|token|secret|auth|cookie|passw|signature", re.IGNORECASE)
ENV_PREFIX = "env:"


def is_secret_header(name: str) -> bool:
    """True for header names that say they carry a credential (``Authorization``, ``X-Api-Key``…)."""
    return bool(_SECRET_NAME.search(name))


def resolve_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Header values of the form ``env:NAME`` replaced by that environment variable's value,
    so a secret need never be typed on a command line. An unset variable is a
    :class:`ConfigError` naming it."""
    resolved: dict[str, str] = {}
    for name, value in headers.items():
        if value.startswith(ENV_PREFIX):
            var = value[len(ENV_PREFIX):].strip()
            if var not in os.environ:
                raise ConfigError(f"--header {name}: environment variable {var!r} is not set "
                                  f"(the header's value is {value!r})")
            value = os.environ[var]
        resolved[name] = value
    return resolved


def redactor(api_key: str, headers: Mapping[str, str]) -> Callable[[str], str]:
    """A function that masks the API key and every secret header's value in a text (servers
    sometimes quote them back in error messages)."""
    secrets = [api_key, *(v for n, v in headers.items() if is_secret_header(n))]
    # Longest first, so that a key inside "Bearer <key>" is masked whole; short values (a
    # header like "Auth: 1") would mask ordinary text, so they are left alone.
    found = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)

    def redact(text: str) -> str:
        for secret in found:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    return redact


def redact_header_arg(item: str) -> str:
    """``'Authorization: Bearer sk-…'`` → ``'Authorization: ***'``; ``env:`` values and
    headers that hold no secret stay as they are."""
    name, sep, value = item.partition(":")
    if not sep or not is_secret_header(name) or value.strip().startswith(ENV_PREFIX):
        return item
    return f"{name}: {MASK}"


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A command line with the values of secret ``--header`` options masked."""
    out: list[str] = []
    after_header = False
    for arg in argv:
        if after_header:
            out.append(redact_header_arg(arg))
            after_header = False
        elif arg == "--header":
            out.append(arg)
            after_header = True
        elif arg.startswith("--header="):
            out.append("--header=" + redact_header_arg(arg[len("--header="):]))
        else:
            out.append(arg)
    return out


def is_loopback(base_url: str) -> bool:
    host = urlsplit(base_url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_key(base_url: str, api_key: str, headers: Mapping[str, str], api_key_env: str) -> None:
    """Refuse (exit 2, before anything is sent) to send unauthenticated requests to a server
    that is not on this machine. A secret header (a gateway's own key) counts as a key."""
    if api_key or is_loopback(base_url) or any(is_secret_header(n) for n in headers):
        return
    raise ConfigError(
        f"no API key: ${api_key_env} is not set and {base_url} is not a local server. Set "
        f"{api_key_env}, or name the variable that holds the key with --api-key-env (for a "
        f"server that needs no key, set it to any value: {api_key_env}=none)")
