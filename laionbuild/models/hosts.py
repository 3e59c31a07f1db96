"""Is a model host reachable? Asked once per host before any download, so that an offline
machine learns it in seconds (not after minutes of retries) and is told which files are missing.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

#: seconds a model host gets to accept a TCP connection before it counts as unreachable
HOST_PROBE_TIMEOUT_S = 5.0
#: Hugging Face's own endpoint when ``HF_ENDPOINT`` is not set
HF_DEFAULT_ENDPOINT = "https://huggingface.co"
_DEFAULT_PORTS = {"http": 80, "https": 443}


def hf_endpoint() -> str:
    """The Hugging Face endpoint downloads go to (``HF_ENDPOINT`` or huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").rstrip("/") or HF_DEFAULT_ENDPOINT


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def source_origins(fetch: dict) -> list[str]:
    """The ``scheme://host[:port]`` each source of a requirement's ``fetch`` spec is read from."""
    if fetch.get("type") in ("hf", "hf-st"):
        return [_origin(hf_endpoint())]
    return list(dict.fromkeys(_origin(u) for u in fetch.get("urls", ()) if "://" in u))


def _proxy_for(url: str) -> str | None:
    """The proxy a request to ``url`` would go through (the standard ``*_proxy`` variables), if any."""
    import urllib.request

    host = urlsplit(url).hostname or ""
    if urllib.request.proxy_bypass(host):
        return None
    return urllib.request.getproxies().get(urlsplit(url).scheme)


def probe(origin: str, timeout_s: float = HOST_PROBE_TIMEOUT_S) -> str | None:
    """None when ``origin`` (or the proxy in front of it) accepts a TCP connection, else why not."""
    target = _proxy_for(origin) or origin
    parts = urlsplit(target if "://" in target else f"http://{target}")
    host = parts.hostname or ""
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme, _DEFAULT_PORTS["https"])
    except ValueError:
        return f"bad address {target!r}"
    via = f" (proxy {target})" if target != origin else ""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror as exc:
        return f"the name {host} does not resolve{via} ({exc.strerror or exc})"
    except socket.timeout:
        return f"no answer within {timeout_s:g} s{via}"
    except ConnectionRefusedError:
        return f"connection refused{via}"
    except OSError as exc:
        return f"{exc.strerror or exc}{via}"


def unreachable_origins(fetch_specs: list[dict], timeout_s: float = HOST_PROBE_TIMEOUT_S) -> dict[str, str]:
    """``{origin: reason}`` for every distinct origin of ``fetch_specs`` that does not answer (each asked once)."""
    origins = list(dict.fromkeys(o for spec in fetch_specs for o in source_origins(spec)))
    out = {}
    for origin in origins:
        reason = probe(origin, timeout_s)
        if reason is not None:
            out[origin] = reason
    return out
