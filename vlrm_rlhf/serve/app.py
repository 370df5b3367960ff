"""The Ray Serve deployment behind ``vlrm-rlhf serve``: replicated VLRM scoring with batching across callers.

Each replica loads the reward model once (``VLRewardScorer.from_pretrained``, as in process) and serves, under the
route ``/ROUTE``:

* ``POST /ROUTE/score``: the wire protocol of ``reward/wire.py`` (samples with images in, rewards in order out,
  the model's name and mode in every answer). Requests are decoded and checked on arrival (a bad one is answered
  400 alone), then queued: ``@serve.batch`` hands up to ``max_batch_size`` callers' requests, gathered for at
  most ``batch_wait_s``, to one scoring call (``serve/batching.py``) in a worker thread.
* ``POST /ROUTE/openrlhf``: OpenRLHF's remote reward protocol (``--remote_rm_url``): ``{"query": [text, ...],
  "prompts": [...], "labels": [...]}`` → ``{"rewards": [...], "scores": [...]}``. ``query`` is prompt + response
  already rendered with the chat template, text only, scored as it is.
* ``GET /ROUTE/health`` and ``GET /ROUTE/ready``: liveness, and the model, mode and batching when it can score.

Ray Serve spreads the replicas over the cluster, restarts failed ones (``check_health``), exports its request
metrics plus ``vlrm_serve_samples`` / ``vlrm_serve_batch_requests`` on Ray's Prometheus endpoint, and drains
in-flight requests on shutdown (``graceful_shutdown_timeout_s``).
"""


import asyncio
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ..errors import VLRMError
from ..reward.inputs import Sample
from ..reward.scorer import Plan
from ..reward.wire import Limits, WireError, decode_request
from .batching import Batching, forward_plan, score_jobs

api = FastAPI(title="vlrm-rlhf served rewards")


@dataclass
class ServeConfig:
    """Everything a replica needs to load and serve one reward model."""

    model: str
    mode: str = "vlrm"
    lvlm: str | None = None
    load: dict[str, Any] = field(default_factory=dict)  # device, dtype, attn_implementation, trust_remote_code
    batching: Batching = "exact"
    max_batch_size: int = 16
    batch_wait_s: float = 0.005
    threads: int = 1
    limits: dict[str, Any] = field(default_factory=dict)  # Limits fields

    @property
    def name(self) -> str:
        """The model's name in every answer: its directory's name."""
        return Path(self.model).name


def _error(status: int, msg: str, cfg: ServeConfig) -> JSONResponse:
    """An error answer: the reason, with the model's name and mode as in every answer."""
    return JSONResponse({"error": msg, "model": cfg.name, "mode": cfg.mode}, status_code=status)


@serve.deployment(graceful_shutdown_timeout_s=20, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(api)
class RewardServer:
    """One replica: a loaded scorer, the request decoder and the batched scoring queue."""

    def __init__(self, cfg: dict[str, Any]):
        import torch

        self.cfg = ServeConfig(**cfg)
        os.environ.setdefault("OMP_NUM_THREADS", str(self.cfg.threads))
        torch.set_num_threads(self.cfg.threads)
        from ..reward.scorer import VLRewardScorer

        load = {k: v for k, v in self.cfg.load.items() if v is not None}
        if load.get("device") == "auto":
            load["device_map"] = load.pop("device")
        self.scorer = VLRewardScorer.from_pretrained(self.cfg.model, mode=self.cfg.mode, lvlm=self.cfg.lvlm, **load)
        lim = dict(self.cfg.limits)
        if lim.get("allowed_root") is not None:
            lim["allowed_root"] = Path(lim["allowed_root"]).resolve()
        self.limits = Limits(**lim)
        self._score_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_s)
        self.stats: dict[str, int] = {"requests": 0, "batches": 0, "forwards": 0, "samples": 0}
        from ray.util import metrics

        self._m_samples = metrics.Counter("vlrm_serve_samples", description="samples scored")
        self._m_batch = metrics.Histogram("vlrm_serve_batch_requests", description="caller requests per batch",
                                          boundaries=[1, 2, 4, 8, 16, 32, 64])

    def check_health(self) -> None:
        """Ray Serve's periodic health check: the model is loaded (a failing replica is replaced)."""
        if self.scorer is None or self.scorer.model is None:
            raise RuntimeError("reward model not loaded")

    def _info(self) -> dict[str, Any]:
        """What ``/ready`` reports: model, mode, batching, limits, this replica's pid and counters."""
        return {"model": self.cfg.name, "mode": self.cfg.mode, "batching": self.cfg.batching,
                "max_batch_size": self.cfg.max_batch_size, "batch_wait_s": self.cfg.batch_wait_s,
                "pid": os.getpid(), "limits": {k: str(v) if isinstance(v, Path) else v
                                                for k, v in asdict(self.limits).items()}, "stats": dict(self.stats)}

    @api.get("/health")
    async def health(self) -> dict[str, Any]:
        """Liveness: this replica answers."""
        return {"status": "ok", "model": self.cfg.name, "mode": self.cfg.mode}

    @api.get("/ready")
    async def ready(self) -> dict[str, Any]:
        """Readiness: the model is loaded and scoring; the model, mode, batching and limits."""
        return {"status": "ready", **self._info()}

    @api.post("/score")
    async def score(self, request: Request) -> JSONResponse:
        """The vlrm-rlhf protocol: ``{"samples": [...]}`` → rewards in order (null + index for non-finite)."""
        try:
            body = await request.json()
        except ValueError as e:
            return _error(400, f"the request body is not JSON: {e}", self.cfg)
        try:
            samples = await asyncio.to_thread(decode_request, body, self.limits)
        except (VLRMError, TypeError, KeyError, AttributeError) as e:  # all raised by the request's content
            return _error(400, str(e) if isinstance(e, VLRMError) else f"malformed request: {type(e).__name__}: {e}",
                          self.cfg)
        return await self._answer(samples)

    @api.post("/openrlhf")
    async def openrlhf(self, request: Request) -> JSONResponse:
        """OpenRLHF's remote reward protocol: rendered ``query`` texts → ``{"rewards": [...]}``."""
        try:
            body = await request.json()
        except ValueError as e:
            return _error(400, f"the request body is not JSON: {e}", self.cfg)
        queries = body.get("query") if isinstance(body, dict) else None
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries) or not queries:
            return _error(400, "OpenRLHF protocol: expected {\"query\": [text, ...], \"prompts\": [...], "
                          "\"labels\": [...]} with a non-empty list of strings in 'query'", self.cfg)
        ans = await self._answer(list(queries), raw_text=True)  # rendered texts: no template applied twice
        if ans.status_code == 200:
            import json

            d = json.loads(ans.body)
            d["scores"] = d["rewards"]
            return JSONResponse(d)
        return ans

    async def _answer(self, samples: list, raw_text: bool = False) -> JSONResponse:
        """Queue the samples (or rendered texts) for batched scoring; rewards (null where non-finite) with the model and mode."""
        self.stats["requests"] += 1
        got = await self._score_batch((samples, raw_text))
        if isinstance(got, BaseException):
            return _error(400 if isinstance(got, VLRMError) else 500, f"{type(got).__name__}: {got}", self.cfg)
        bad = [i for i, v in enumerate(got) if not math.isfinite(v)]
        return JSONResponse({"rewards": [None if i in bad else v for i, v in enumerate(got)], "non_finite": bad,
                             "model": self.cfg.name, "mode": self.cfg.mode})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _score_batch(self, jobs: list[tuple[list, bool]]) -> list[Any]:
        """Several callers' requests scored in one worker-thread call (``serve/batching.py``)."""
        self.stats["batches"] += 1
        self._m_batch.observe(len(jobs))
        n = sum(len(s) for s, _ in jobs)
        out = await asyncio.to_thread(self._score_jobs, jobs)
        self._m_samples.inc(n)
        return out

    def _score_jobs(self, jobs: list[tuple[list, bool]]) -> list[Any]:
        """Rewards (or an exception) per job; OpenRLHF jobs (rendered texts) apart from protocol ones."""
        raw = [s for s, r in jobs if r]
        if raw:  # OpenRLHF texts are already rendered: bypass the chat template for them
            return [self._score_raw(s) if r else score_jobs(self.scorer, [s], self.cfg.batching, self.stats)[0]
                    for s, r in jobs]
        return score_jobs(self.scorer, [s for s, _ in jobs], self.cfg.batching, self.stats)

    def _score_raw(self, texts: list[str]) -> list[float] | BaseException:
        """Rewards of already-rendered texts (OpenRLHF queries), micro-batched under the scorer's token budget."""
        s = self.scorer
        try:
            if s.tokenizer is None:
                raise WireError(f"{self.cfg.name} scores through its own get_score API: the OpenRLHF endpoint needs "
                                "a tokenizer-based reward model")
            lengths = [len(s.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
            if s.max_length is not None and max(lengths) > s.max_length:
                i = max(range(len(lengths)), key=lengths.__getitem__)
                raise WireError(f"query {i} has {lengths[i]} tokens, over the model's context of {s.max_length}")
            order = sorted(range(len(texts)), key=lengths.__getitem__)
            batches, cur = [], []
            for i in order:
                if cur and (len(cur) + 1) * lengths[i] > s.max_batch_tokens:
                    batches.append(cur)
                    cur = []
                cur.append(i)
            batches.append(cur)
            return forward_plan(s, Plan([Sample([], []) for _ in texts], texts, lengths, batches), self.stats)
        except Exception as e:  # noqa: BLE001  (answered 400/500 for this request only)
            return e


def build_app(cfg: ServeConfig, *, replicas: int = 1, cpus_per_replica: float = 1.0, gpus_per_replica: float = 0.0):
    """The bound Serve application: ``replicas`` copies of ``RewardServer`` with their resources."""
    opts: dict[str, Any] = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        opts["num_gpus"] = gpus_per_replica
    threads = max(1, int(cpus_per_replica)) if cfg.threads <= 0 else cfg.threads
    cfg = ServeConfig(**{**asdict(cfg), "threads": threads})
    return RewardServer.options(num_replicas=replicas, ray_actor_options=opts,
                                max_ongoing_requests=max(8, 4 * cfg.max_batch_size)).bind(asdict(cfg))
