"""The one typed settings object; the only place that reads the environment."""

from __future__ import annotations

import ipaddress
import json
import re
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote
from typing import Literal, get_args

from pydantic import AliasChoices, Field, computed_field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODELS_DIR = ROOT / "data" / "models"
DEFAULT_MODEL_DIR = DEFAULT_MODELS_DIR / DEFAULT_MODEL
# A model folder declares the name it is served under (its queue, its id in the OpenAI API) in this file.
MODEL_DECLARATION = "chatqueue.json"
# Signs session cookies; accepted only while the servers listen on loopback.
DEFAULT_SECRET_KEY = "change-me-in-production"

# Linear layers' weights: as loaded, or quantized (workers.kernels.QUANTIZED).
Quantize = Literal["none", "int8", "int4"]
QUANTIZE_MODES = get_args(Quantize)[1:]


class Settings(BaseSettings):
    """Every knob of both tiers; read from ``CHAT_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CHAT_", env_file=None, extra="ignore", frozen=True,
                                      populate_by_name=True)

    # Where things live and listen. ``host`` is the address clients dial; the local servers (web, Flower, and
    # under ``make run`` Redis and PostgreSQL) listen on ``bind`` (empty: ``host``), e.g. 0.0.0.0 for all.
    data_dir: Path = ROOT / "data"
    host: str = "127.0.0.1"
    bind: str = ""
    web_port: int = 8000
    flower_port: int = 5555
    redis_port: int = 6390
    primary_port: int = 5440
    replica_port: int = 5441

    # Backing services. Empty means "the local ones on the ports above", with these passwords (none: they
    # take connections from this machine only).
    broker_url: str = ""
    redis_url: str = ""
    database_url: str = ""
    replica_url: str = ""
    redis_password: str = ""
    db_password: str = ""

    # The model: a name (its folder in ``models_dir``) or a folder. Its queue is the name the folder declares.
    model: str = DEFAULT_MODEL
    models_dir: Path = DEFAULT_MODELS_DIR
    model_queue: str = ""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = "auto"
    torch_threads: int = 0
    prepack: bool = True
    fuse_projections: bool = True
    # "int8" / "int4": linear layers with INT8 weights (one scale per output) or INT4 weights (16 steps a group of
    # 32, as a Q4_1 file holds them) instead of the model's dtype, on CPU; the vocabulary projection keeps it. Off
    # by default: a lone request's tokens came faster, but 16 chats' slower, and each lost factual answers the
    # plain model got right (docs/benchmarks.md, "Quantized weights").
    quantize: Quantize = "none"
    # "auto": where the engine computes in float32 on a CPU (one without native bfloat16), linear layers keep their
    # weights in float16 when that loses none of their values (a bfloat16 or float16 checkpoint), computed in float32
    # through FBGEMM: half the bytes a pass reads. "off": float32 weights.
    float16_weights: Literal["auto", "off"] = "auto"
    engine: Literal["batching", "generate"] = "batching"
    max_batch: int = Field(16, ge=1)
    engine_max_tokens: int = Field(2048, ge=64)
    prefill_tokens_per_pass: int = Field(64, ge=1)
    # How much lower the engine thread's CPU priority is (Linux nice, added to the worker's) than the rest of the
    # worker and the host's other processes: the engine takes every core it is given, and the web tier, Redis,
    # PostgreSQL and the worker's own Celery consumer, which a new chat passes through before its first token,
    # would otherwise wait their turn behind it on a host they share. 0 leaves it as the worker's.
    engine_nice: int = Field(5, ge=0, le=19)
    # Memory a worker keeps the prompts of finished requests in, for the next turn of their conversations to
    # compute only what is new; 0 turns the reuse off.
    prefix_cache_mb: float = Field(512, ge=0)
    # How long the web tier sends a conversation's next turn to the worker that served its last (which kept its
    # prompt), while that worker is alive and has room; 0 sends every turn to the model's shared queue.
    affinity_ttl_s: int = Field(3600, ge=0)
    worker_concurrency: int = Field(0, ge=0)
    cpu_workers: int = Field(1, ge=1)
    gpus: str | None = Field(None, validation_alias=AliasChoices("CHAT_GPUS", "CUDA_VISIBLE_DEVICES"))
    system_prompt: str = "You are a helpful assistant."

    # Limits.
    max_content_chars: int = Field(8000, ge=1)
    max_frame_bytes: int = Field(65536, ge=1024)
    default_max_new_tokens: int = Field(256, ge=1)
    max_new_tokens_cap: int = Field(512, ge=1)
    max_temperature: float = Field(2.0, ge=0)
    allowed_origins: list[str] = []

    # Admission: refusals before anything is stored or queued.
    max_queue_depth: int = Field(64, ge=1)
    # Refused `busy` too when the waiting tasks would take the workers longer than this to start (0: no such
    # limit), at the rate they have taken tasks off the queue over the last 30 s.
    max_queue_wait_s: float = Field(5, ge=0)
    busy_retry_after_s: float = Field(2.0, gt=0)
    rate_limit_per_minute: float = Field(30, ge=0)
    rate_limit_burst: int = Field(10, ge=1)

    # Token streams in Redis.
    stream_ttl_s: int = Field(3600, ge=10)
    stream_maxlen: int = Field(20000, ge=100)
    worker_heartbeat_s: int = Field(5, ge=1)
    # A running task's hold on its broker message: renewed by its worker every fifth of it, handed back to the
    # queue when its worker stops renewing (it died).
    task_lease_s: float = Field(10, ge=2)
    # How long a worker host keeps trying to reach the broker and the database at start before it says which it
    # cannot reach and exits (a refusal, a missing model: at once).
    join_timeout_s: float = Field(30, gt=0)
    # Told to stop, a worker finishes its requests for up to this long, then hands the rest back to the queue.
    worker_drain_s: float = Field(30, ge=0)

    # Web server.
    web_workers: int = Field(1, ge=1)
    # Redis and database connections of one web process grow with this (requests beyond wait for one).
    web_pool_size: int = Field(64, ge=4)
    # Connections each web process opens when it starts, to each database, Redis and the broker, so that the first
    # burst of chats does not wait for them to be opened (0: each is opened when first needed).
    web_warm_connections: int = Field(16, ge=0)
    secret_key: str = DEFAULT_SECRET_KEY
    # Proxies in front of the web tier whose X-Forwarded-For/-Proto are believed (the caller's address).
    proxy_hops: int = Field(0, ge=0)
    # Most WebSockets one web process holds; a handshake past it is refused with 503 at once.
    max_sockets: int = Field(10000, ge=1)

    # Callers. The embedding site signs a JWT for its user (the caller is its issuer plus its sub): HS256 with
    # this shared secret, or a key published at this JWKS URL.
    jwt_secret: str = ""
    jwt_jwks_url: str = ""
    # Issuers whose tokens are accepted (empty: any that verifies); the audience required, if any.
    jwt_issuers: list[str] = []
    jwt_audience: str = ""
    jwt_leeway_s: float = Field(30, ge=0)
    # Guests: `POST /api/guest` signs a short-lived token for a new (or returning) guest, for allowed origins.
    guests: bool = False
    guest_token_ttl_s: int = Field(3600, ge=60)
    guest_renew_s: int = Field(30 * 24 * 3600, ge=0)
    guest_rate_per_minute: float = Field(10, ge=0)
    guest_rate_burst: int = Field(20, ge=1)
    # Flower's basic auth, "user:password"; `make run` makes one up (and prints it) where it is empty.
    flower_basic_auth: str = ""

    # Prometheus: each worker serves its own metrics on this port (the launcher gives its i-th worker this plus
    # i; 0: none); `metrics` off stops the workers' observing altogether.
    metrics: bool = True
    worker_metrics_port: int = Field(9400, ge=0)

    log_level: str = "INFO"
    log_json: bool = False

    @computed_field
    @property
    def resolved_bind(self) -> str:
        return self.bind or self.host

    @computed_field
    @property
    def resolved_redis_url(self) -> str:
        """Token streams, heartbeats: where set, else the broker's Redis, else the local one."""
        if self.redis_url:
            return self.redis_url
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            return self.broker_url
        return self._local_redis()

    @computed_field
    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or self.redis_url or self._local_redis()

    @computed_field
    @property
    def resolved_database_url(self) -> str:
        # Both local servers, the primary first: libpq takes the first that accepts writes, so a promoted
        # replica is found without a restart.
        return self.database_url or _local_pg(self.host, [self.primary_port, self.replica_port], self.db_password,
                                              "read-write")

    @computed_field
    @property
    def resolved_replica_url(self) -> str:
        return self.replica_url or _local_pg(self.host, [self.replica_port], self.db_password)

    def _local_redis(self) -> str:
        auth = f":{quote(self.redis_password, safe='')}@" if self.redis_password else ""
        return f"redis://{auth}{self.host}:{self.redis_port}/0"

    @computed_field
    @property
    def resolved_worker_concurrency(self) -> int:
        """Celery task threads per worker: by default one per engine slot."""
        if self.worker_concurrency:
            return self.worker_concurrency
        return self.max_batch if self.engine == "batching" else 1

    @computed_field
    @property
    def model_dir(self) -> Path:
        """The folder a worker loads: ``model`` itself where it is a path, else its folder in ``models_dir``."""
        return Path(self.model).expanduser() if model_is_path(self.model) else self.models_dir / self.model

    @computed_field
    @property
    def model_name(self) -> str:
        """The name the model is served under: the one its folder declares, else ``model`` where that is a name
        (a web host has no model folder), else the folder's name."""
        declared = declared_model_name(str(self.model_dir))
        if declared:
            return declared
        return Path(self.model.rstrip("/")).name if model_is_path(self.model) else self.model

    @computed_field
    @property
    def model_id(self) -> str:
        """The model's name in the OpenAI API (``GET /v1/models``): its queue's, without ``gen.``."""
        return self.queue.removeprefix("gen.")

    @computed_field
    @property
    def queue(self) -> str:
        """The Celery queue of this model: ``gen.<model name>``; workers and web agree on it."""
        if self.model_queue:
            return self.model_queue
        return "gen." + re.sub(r"[^a-z0-9]+", "-", self.model_name.lower()).strip("-")


def listen_addresses(bind: str) -> list[str]:
    """Where a local server listens: ``bind``, and loopback too (this machine's own tools and checks dial it)."""
    if bind in ("", "localhost"):
        return ["127.0.0.1"]
    return [bind] if on_loopback(bind) or bind in ("0.0.0.0", "::", "*") else ["127.0.0.1", bind]


def model_is_path(model: str) -> bool:
    """``CHAT_MODEL`` names a folder (``/models/x``, ``./x``, ``~/x``) rather than a model."""
    return "/" in model or model.startswith((".", "~"))


@lru_cache(maxsize=16)
def declared_model_name(folder: str) -> str | None:
    """The name ``folder`` declares in its :data:`MODEL_DECLARATION` (written by ``workers.fetch_model``)."""
    try:
        name = json.loads((Path(folder) / MODEL_DECLARATION).read_text())["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name.strip() else None


def on_loopback(host: str) -> bool:
    """Whether ``host`` (an address servers listen on) is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_pg(host: str, ports: list[int], password: str, session_attrs: str | None = None) -> str:
    """The SQLAlchemy URL of the local servers on ``ports``, tried in turn (libpq's multi-host form)."""
    user = f"chat:{quote(password, safe='')}" if password else "chat"
    if len(ports) == 1 and session_attrs is None:
        return f"postgresql+psycopg://{user}@{host}:{ports[0]}/chat"
    hosts = "&".join(f"host={host}:{port}" for port in ports)
    return f"postgresql+psycopg://{user}@/chat?{hosts}" + (f"&target_session_attrs={session_attrs}" if session_attrs else "")
