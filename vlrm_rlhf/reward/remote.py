"""Client of a served VLRM (``vlrm-rlhf serve``): an async GRPO/RLOO reward function behind a URL.

``RemoteReward("http://host:port/vlrm")`` posts TRL's reward arguments to ``<url>/score`` (the wire format is in
``reward/wire.py``) and returns the rewards in order. TRL 1.16 runs ``async`` reward functions concurrently on its
own event loop; ``VLPPOTrainer`` and ``best_of_n`` call it synchronously (``call_reward``, ``score_candidates``).
Only the standard library speaks HTTP here (``urllib`` in a thread pool): the client needs neither Ray nor an
HTTP package. Faults never lose a reward silently: a server that cannot be reached, that times out or answers
5xx is retried with exponential backoff, then a ``RemoteRewardError`` names the URL and the last cause; a 4xx
answer (bad input) or a malformed / wrong-length answer raises at once.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from ..errors import VLRMError
from .trl import check_finite
from .wire import trl_wire_samples, wire_sample

__all__ = ["RemoteReward", "RemoteRewardError", "call_reward", "is_url", "run_sync"]

RETRY_STATUS = frozenset({500, 502, 503, 504})
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


class RemoteRewardError(VLRMError, ConnectionError):
    """A reward server that cannot be reached, times out, refuses the input, or answers outside the protocol."""


def is_url(x: Any) -> bool:
    """Whether ``x`` is an ``http://`` or ``https://`` URL (a served reward rather than a model directory)."""
    return isinstance(x, str) and x.startswith(("http://", "https://"))


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code, also when this thread already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["v"] = asyncio.run(coro)
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
            box["e"] = e

    t = threading.Thread(target=target, name="vlrm-run-sync")
    t.start()
    t.join()
    if "e" in box:
        raise box["e"]
    return box["v"]


def call_reward(func: Callable[..., Any], **kw: Any) -> Any:
    """Call a GRPO-protocol reward function synchronously, awaiting it if it is async (``RemoteReward``)."""
    out = func(**kw)
    return run_sync(out) if inspect.isawaitable(out) else out


def _pool() -> ThreadPoolExecutor:
    """The threads that carry blocking HTTP calls (one per request in flight; shared by every client)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=64, thread_name_prefix="vlrm-http")
        return _POOL


def _http(method: str, url: str, body: bytes | None, timeout: float) -> tuple[int, bytes]:
    """One blocking HTTP exchange: (status, body). HTTP error statuses are returned, not raised."""
    req = urllib.request.Request(url, data=body, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310  (http/https only: is_url)
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class RemoteReward:
    """A served VLRM as a GRPO/RLOO reward function (``async def __call__``), and a scorer for ``best_of_n``.

    Args:
        url: the server's URL as ``vlrm-rlhf serve`` prints it (``http://host:port/ROUTE``).
        name: ``__name__`` for TRL's logs; default ``remote_<model>`` (``_<mode>`` for other modes than vlrm).
        timeout: seconds per attempt; retries: attempts after the first; backoff: first wait (doubled each time).
        non_finite: ``"raise"`` or ``"none"``, the same policy as ``VLRMReward``.
        check: ask ``<url>/ready`` now, so a server that is down fails before training starts.
        send_paths: send image paths as paths (the server reads them under its ``--allowed-root``) instead of
            reading the files here and sending their bytes.
        expect_model: refuse answers from a server that serves another model name.
    """

    def __init__(self, url: str, *, name: str | None = None, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, non_finite: Literal["raise", "none"] = "raise", check: bool = True,
                 send_paths: bool = False, expect_model: str | None = None):
        if not is_url(url):
            raise RemoteRewardError(f"{url!r} is not an http:// or https:// URL")
        if non_finite not in ("raise", "none"):
            raise ValueError(f"non_finite must be 'raise' or 'none', not {non_finite!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"need timeout > 0, retries >= 0, backoff >= 0 (got {timeout}, {retries}, {backoff})")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.non_finite, self.send_paths, self.expect_model = non_finite, send_paths, expect_model
        self.model: str | None = expect_model
        self.mode: str = "vlrm"
        self.requests = 0  # HTTP attempts made (retries included)
        if check:
            info = self.ready()
            self.model, self.mode = info.get("model", self.model), info.get("mode", self.mode)
        stem = "".join(c if c.isalnum() else "_" for c in (self.model or "server")).strip("_") or "server"
        self.__name__ = name or f"remote_{stem}" + ("" if self.mode == "vlrm" else f"_{self.mode}")

    def __repr__(self) -> str:
        return f"RemoteReward({self.url!r}, name={self.__name__!r})"

    # ---- TRL protocol ---------------------------------------------------------------------------------
    async def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                       completion_ids: Sequence[Sequence[int]] | None = None, trainer_state: Any = None,
                       log_extra: Callable[[str, list], None] | None = None,
                       log_metric: Callable[[str, float], None] | None = None, **columns: Any) -> list[float | None]:
        """One reward per completion, scored by the server (``None`` only under ``non_finite="none"``)."""
        samples = trl_wire_samples(prompts, completions, columns, send_paths=self.send_paths)
        t0 = time.perf_counter()
        raw = await self.score_wire(samples)
        if log_metric is not None:
            finite = [v for v in raw if math.isfinite(v)]
            if finite:
                log_metric(f"{self.__name__}/raw_mean", sum(finite) / len(finite))
            log_metric(f"{self.__name__}/latency_s", time.perf_counter() - t0)
        return check_finite(self.__name__, raw, prompts, completions, self.non_finite)

    # ---- scorer API (best_of_n, scripts) --------------------------------------------------------------
    def score(self, conversations: Sequence[Any] | None = None, *, prompts: Sequence[Any] | None = None,
              responses: Sequence[Any] | None = None, images: Sequence[Any] | None = None) -> list[float]:
        """Raw rewards (NaN where non-finite), as ``VLRewardScorer.score`` returns them, computed by the server."""
        if conversations is not None:
            pairs = [(c, None) for c in conversations]
        else:
            if prompts is None or responses is None or len(prompts) != len(responses):
                raise RemoteRewardError("prompts and responses must both be given, with equal lengths")
            pairs = list(zip(prompts, responses, strict=True))
        if images is not None and len(images) != len(pairs):
            raise RemoteRewardError(f"{len(images)} image entries for {len(pairs)} samples")
        wire, memo = [], {}  # memo: an image shared by several samples is encoded once
        for i, (p, r) in enumerate(pairs):
            ims = images[i] if images is not None else None
            ims = [] if ims is None else list(ims) if isinstance(ims, list | tuple) else [ims]
            wire.append(wire_sample(p, r if r is not None else [], ims, send_paths=self.send_paths, memo=memo))
        return run_sync(self.score_wire(wire))

    def score_candidates(self, prompt: Any, responses: Sequence[Any], images: Any = None) -> list[float]:
        """Rewards of N responses to one prompt (``best_of_n``'s scorer interface); one request."""
        return self.score(prompts=[prompt] * len(responses), responses=list(responses),
                          images=None if images is None else [images] * len(responses))

    # ---- HTTP -----------------------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """``<url>/ready`` (retried like a score request): the server's model, mode and replica facts."""
        return run_sync(self._request("GET", "/ready", None, what="readiness check"))

    async def score_wire(self, samples: list[dict[str, Any]]) -> list[float]:
        """Raw rewards (NaN where the server reports a non-finite value) for wire samples, in order."""
        body = json.dumps({"samples": samples}).encode()
        ans = await self._request("POST", "/score", body, what=f"scoring {len(samples)} sample(s)")
        return self._rewards(ans, len(samples))

    def _rewards(self, ans: Any, n: int) -> list[float]:
        """Validate an answer: a ``rewards`` list of n numbers or nulls (nulls exactly at ``non_finite``)."""
        where = f"reward server {self.url}"
        if not isinstance(ans, dict) or not isinstance(ans.get("rewards"), list):
            raise RemoteRewardError(f"{where} answered outside the protocol (no 'rewards' list): {str(ans)[:200]}")
        if self.expect_model is not None and ans.get("model") != self.expect_model:
            raise RemoteRewardError(f"{where} serves model {ans.get('model')!r}, not {self.expect_model!r}")
        rewards, bad = ans["rewards"], ans.get("non_finite") or []
        if len(rewards) != n:
            raise RemoteRewardError(f"{where} returned {len(rewards)} rewards for {n} samples")
        if not isinstance(bad, list) or not all(isinstance(i, int) and 0 <= i < n for i in bad):
            raise RemoteRewardError(f"{where} answered a malformed 'non_finite' list: {str(bad)[:200]}")
        out: list[float] = []
        for i, r in enumerate(rewards):
            if r is None and i in bad:
                out.append(math.nan)
            elif isinstance(r, int | float) and not isinstance(r, bool) and i not in bad:
                out.append(float(r))
            else:
                raise RemoteRewardError(f"{where} returned {r!r:.80} as the reward of sample {i}; expected a number "
                                        "(or null for a non-finite reward listed in 'non_finite')")
        return out

    async def _request(self, method: str, path: str, body: bytes | None, *, what: str) -> Any:
        """One protocol exchange with retries: connection errors, timeouts and 5xx are retried with backoff."""
        url = self.url + path
        loop = asyncio.get_running_loop()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            self.requests += 1
            try:
                status, data = await loop.run_in_executor(_pool(), _http, method, url, body, self.timeout)
            except (urllib.error.URLError, ConnectionError, OSError) as e:
                if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
                    last = f"no answer within the timeout of {self.timeout:g} s"
                else:
                    last = f"unreachable ({getattr(e, 'reason', e)})"
                continue
            if status in RETRY_STATUS:
                last = f"HTTP {status}: {_message(data)}"
                continue
            if status != 200:
                raise RemoteRewardError(f"reward server {self.url} refused {what} (HTTP {status}): {_message(data)}")
            try:
                return json.loads(data)
            except ValueError:
                raise RemoteRewardError(f"reward server {self.url} answered {what} with non-JSON: "
                                        f"{data[:200]!r}") from None
        raise RemoteRewardError(f"reward server {self.url} failed {what} after {self.retries + 1} attempt(s): "
                                f"{last}. Is `vlrm-rlhf serve` running there (and reachable from this machine)?")


def _message(data: bytes) -> str:
    """The ``error`` field of a JSON error answer, else the start of the body."""
    try:
        d = json.loads(data)
        if isinstance(d, dict):
            return str(d.get("error") or d.get("detail") or d)[:500]
    except ValueError:
        pass
    return data[:300].decode("utf-8", "replace")
