"""Start and stop a reward server: Ray (local, ``auto`` or ``ray://``), Serve's HTTP proxy, the application.

``start_server`` returns the URL clients pass to ``reward_funcs``; ``serve_forever`` blocks until SIGINT/SIGTERM
and then shuts Serve down gracefully (in-flight requests drain; replicas stop); ``stop_server`` does that now.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

from ..errors import VLRMError
from .app import ServeConfig, build_app

_STARTED: dict[str, Any] = {}  # what start_server set up in this process: app names, whether it started Ray


def app_name(route: str) -> str:
    """The Serve application's name for a route (several reward models can share a cluster on other routes)."""
    return "vlrm-rlhf-" + (route.strip("/").replace("/", "-") or "root")


class ServeError(VLRMError, RuntimeError):
    """The server could not start (Ray unreachable, port taken, model failed to load in a replica)."""


def shown_host(host: str) -> str:
    """A host name clients can use: the machine's address when the server listens on all interfaces."""
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent: picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


def start_server(cfg: ServeConfig, *, replicas: int = 1, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0,
                 host: str = "127.0.0.1", port: int = 8000, route: str = "vlrm", address: str | None = None,
                 ray_init: dict[str, Any] | None = None, timeout_s: float = 600.0) -> str:
    """Deploy ``replicas`` copies of the reward model; return ``http://HOST:PORT/ROUTE`` once every one is ready."""
    import ray
    from ray import serve

    if replicas < 1:
        raise ServeError(f"--replicas must be >= 1, got {replicas}")
    if not ray.is_initialized():
        _STARTED["own_ray"] = address is None
        try:
            ray.init(address=address, **({"include_dashboard": False} | (ray_init or {})))
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ServeError(f"cannot start or reach Ray (address={address!r}): {e}") from e
    serve.start(http_options={"host": host, "port": port})
    route = "/" + route.strip("/")
    name = app_name(route)
    app = build_app(cfg, replicas=replicas, cpus_per_replica=cpus_per_replica, gpus_per_replica=gpus_per_replica)
    done: dict[str, Any] = {}

    def deploy() -> None:
        try:
            serve.run(app, name=name, route_prefix=route, blocking=False)
        except BaseException as e:  # noqa: BLE001  (reported below)
            done["e"] = e
        done["ok"] = True

    t = threading.Thread(target=deploy, daemon=True)
    t.start()
    t.join(timeout_s)
    if "e" in done or not done:
        try:
            serve.delete(name)
        except Exception:  # noqa: BLE001  (best effort)
            pass
        why = done.get("e", f"not ready after {timeout_s:g} s")
        raise ServeError(f"the reward model {cfg.model} did not deploy: {str(why).strip().splitlines()[-1] if str(why) else why}")
    _STARTED.setdefault("apps", []).append(name)
    return f"http://{shown_host(host)}:{port}{route}"


def stop_server() -> None:
    """Stop what ``start_server`` started, in-flight requests draining first: on a Ray it started, Serve and Ray;
    on a cluster it joined (``--address``), only its applications (other routes keep serving), then disconnect."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        return
    if _STARTED.get("own_ray", True):
        serve.shutdown()
    else:
        for name in _STARTED.get("apps", []):
            serve.delete(name)
    _STARTED.clear()
    ray.shutdown()


def serve_forever(poll_s: float = 1.0) -> None:
    """Block until SIGINT or SIGTERM, then stop gracefully."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.is_set():
        time.sleep(poll_s)
    stop_server()
