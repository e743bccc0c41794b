"""atoll's one settings schema: defaults and help text here; TOML file, environment and CLI flags derive from it.

Precedence, lowest first: defaults < TOML file (`--config`, top-level keys) <
environment (`ATOLL_<NAME>`, e.g. ATOLL_PORT=9000) < command-line flags
(`--<name-with-dashes>`). A bad value anywhere exits with a message naming the key
and where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hardware.governor import GovernorThresholds
from runtime.errors import BadRequest
from sync.verify import SyncConfig


class ConfigError(BadRequest):
    """A setting has a bad value; the message names it and its source."""


def _opt(default: Any, help: str, *, minimum: float | None = None, maximum: float | None = None,
         choices: tuple[str, ...] = ()) -> Any:
    return field(default=default, metadata={"help": help, "min": minimum, "max": maximum, "choices": choices})


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    """Every setting of the daemon."""

    state_dir: Path = _opt(Path("/var/lib/atoll"), "state directory: database, model store, trust root")
    host: str = _opt("0.0.0.0", "address to listen on (0.0.0.0: every interface of the LAN)")
    port: int = _opt(8080, "TCP port to listen on", minimum=1, maximum=65535)
    n_ctx: int = _opt(2048, "context window (tokens) each model is loaded with", minimum=64)
    threads: int = _opt(_default_threads(), "CPU threads per inference worker", minimum=1)
    queue_size: int = _opt(16, "requests that may wait per model before new ones get 429", minimum=1)
    request_timeout: float = _opt(300.0, "seconds a request may take, queueing included", minimum=1)
    load_timeout: float = _opt(120.0, "seconds a model may take to load before the worker is restarted",
                               minimum=1)
    max_body_bytes: int = _opt(4 * 1024 * 1024, "largest request body accepted (bytes)", minimum=1024)
    completion_max_tokens_default: int = _opt(
        16, "max_tokens for /v1/completions when the request gives none (OpenAI's default)", minimum=1)
    log_prompts: bool = _opt(False, "store prompt and completion text in the usage log (off: metadata only)")
    log_level: str = _opt("info", "logging level", choices=("debug", "info", "warning", "error"))
    public_url: str = _opt("", "URL users reach the daemon at, shown on first start (default: from host/port)")
    sensor_replay: str = _opt("", "replay a recorded sensor timeline (JSON lines file, or a bundled name such as "
                              "'overheat') instead of reading this machine's sensors: for tests and demos")
    governor_interval: float = _opt(5.0, "seconds between two hardware probes of the governor", minimum=0.05)
    ram_headroom_mb: int = _opt(1024, "RAM (MiB) kept free when choosing which model variant fits", minimum=0)
    vram_headroom_mb: int = _opt(512, "GPU memory (MiB) kept free on each GPU when offloading layers", minimum=0)
    constrained_budget_fraction: float = _opt(
        0.7, "share of available memory model variants may use while the box is constrained", minimum=0.05)
    constrained_max_concurrent: int = _opt(
        1, "generations that may run at once across all models while constrained", minimum=1)
    critical_drain_seconds: float = _opt(
        10.0, "when the box turns critical, seconds running requests get to finish before they are cancelled",
        minimum=0)
    swap_drain_seconds: float = _opt(
        30.0, "seconds a running request may take to finish before a variant swap cancels it", minimum=0)
    shutdown_drain_seconds: float = _opt(
        10.0, "on SIGTERM, seconds running requests get to finish before their streams end with an error "
        "(keep it under the unit's TimeoutStopSec)", minimum=0)
    max_upload_bytes: int = _opt(64 << 30, "largest bundle accepted by POST /admin/bundles (bytes)", minimum=1)
    # -- the edge: what one request or one client may cost (see daemon/bodies.py, daemon/server_limits.py)
    max_messages: int = _opt(1024, "most chat messages one request may hold (also never more than n_ctx)", minimum=1)
    max_chars_per_token: int = _opt(
        128, "characters per context token above which a prompt is refused before tokenizing (no served "
        "vocabulary has a longer token)", minimum=8)
    header_timeout: float = _opt(15.0, "seconds a client has to send a request's headers, from its first byte",
                                 minimum=0.1)
    body_timeout: float = _opt(30.0, "seconds a request body may go without a byte before the connection is "
                               "closed", minimum=0.1)
    keepalive_timeout: float = _opt(15.0, "seconds an idle keep-alive connection stays open", minimum=0.1)
    max_connections: int = _opt(1024, "open client connections at most (more are answered 503 and closed)",
                                minimum=1)
    max_connections_per_ip: int = _opt(64, "open client connections per source address at most", minimum=1)
    auth_failures_allowed: int = _opt(
        10, "failed authentications a source address may make per auth_window before it gets 429", minimum=1)
    auth_window: float = _opt(60.0, "seconds over which failed authentications are counted", minimum=1)
    usage_retention_days: int = _opt(
        90, "days usage records are kept (older ones are deleted hourly); 0 keeps them for ever", minimum=0)
    usb_watch: bool = _opt(True, "watch the media directories for update bundles on USB sticks")
    media_dirs: str = _opt("/media:/run/media", "where USB sticks are mounted, ':'-separated")
    # -- signed updates: the same for `atoll serve` (USB, upload) and `atoll import`/`rollback`/`bundle`
    product: str = _opt("atoll", "product name a bundle's `product` must equal to install here")
    device_class: str = _opt("generic", "this box's device class, matched against a bundle's `compatible` list")
    health_timeout: float = _opt(120.0, "seconds the health check of a new release (each model loaded in a fresh "
                                 "worker, a smoke prompt) may take before the import is undone", minimum=0.1)
    password_min_length: int = _opt(12, "shortest password accepted for an account (NIST SP 800-63B: length, "
                                    "no composition rules)", minimum=8, maximum=256)
    session_idle_minutes: float = _opt(30.0, "a login session ends after this many minutes without a request "
                                       "(a signed policy may lower it)", minimum=1)
    session_absolute_hours: float = _opt(12.0, "a login session ends this many hours after login, used or not "
                                         "(a signed policy may lower it)", minimum=0.1)
    login_backoff_seconds: float = _opt(1.0, "after N wrong passwords in a row, wait this times 2^(N-1) seconds "
                                        "before the next try (per account and per source address)", minimum=0)
    lockout_minutes: float = _opt(15.0, "how long the 6th wrong password in a row locks an account", minimum=0.1)
    setup_code_minutes: float = _opt(60.0, "lifetime of the one-time setup code made on a box with no accounts",
                                     minimum=1)
    tls: bool = _opt(False, "serve HTTPS only (certificate from tls_cert/tls_key; make one with `atoll tls init`)")
    tls_cert: str = _opt("", "TLS certificate chain, PEM (default: <state_dir>/tls/cert.pem)")
    tls_key: str = _opt("", "TLS private key, PEM, unencrypted (default: <state_dir>/tls/key.pem)")
    http_loopback_port: int = _opt(0, "with TLS on, also serve plain HTTP on 127.0.0.1 at this port (0: never)",
                                   minimum=0, maximum=65535)
    governor: GovernorThresholds = field(default_factory=GovernorThresholds, metadata={
        "help": "thresholds of the thermal/memory governor: a [governor] table in the TOML file only",
        "toml_table": True})

    @classmethod
    def fields(cls) -> tuple[dataclasses.Field[Any], ...]:
        """The schema's fields."""
        return dataclasses.fields(cls)

    @property
    def db_path(self) -> Path:
        """The SQLite state database."""
        return self.state_dir / "atoll.db"

    def sync_config(self, daemon_version: str | None = None) -> SyncConfig:
        """The sync config every import path uses (USB, upload, `atoll import`): one source of truth."""
        cfg = SyncConfig(product=self.product, device_class=self.device_class, health_timeout=self.health_timeout)
        return cfg if daemon_version is None else dataclasses.replace(cfg, daemon_version=daemon_version)

    def url(self) -> str:
        """Base URL for humans: public_url, or built from host and port."""
        if self.public_url:
            return self.public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"


def _type_of(f: dataclasses.Field[Any]) -> type:
    hints = typing.get_type_hints(Settings)
    t = hints[f.name]
    if isinstance(t, types.UnionType):
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _coerce(f: dataclasses.Field[Any], value: Any, source: str) -> Any:
    t = _type_of(f)
    try:
        if t is bool:
            if isinstance(value, bool):
                out: Any = value
            elif isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                out = value.lower() in ("1", "true", "yes", "on")
            else:
                raise ValueError("expected true or false")
        elif t is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError("expected an integer")
            out = int(value)
        elif t is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            out = float(value)
        elif t is Path:
            if not isinstance(value, (str, Path)):
                raise ValueError("expected a path")
            out = Path(value)
        else:
            if not isinstance(value, str):
                raise ValueError("expected a string")
            out = value
    except ValueError as e:
        raise ConfigError(f"{source}: setting {f.name!r} = {value!r}: {e}") from None
    if isinstance(out, float) and not math.isfinite(out):
        raise ConfigError(f"{source}: setting {f.name!r} = {value!r}: must be a finite number")
    lo, hi = f.metadata.get("min"), f.metadata.get("max")
    if lo is not None and out < lo:
        raise ConfigError(f"{source}: setting {f.name!r} = {value!r}: must be at least {lo}")
    if hi is not None and out > hi:
        raise ConfigError(f"{source}: setting {f.name!r} = {value!r}: must be at most {hi}")
    choices = f.metadata.get("choices")
    if choices and out not in choices:
        raise ConfigError(f"{source}: setting {f.name!r} = {value!r}: one of {', '.join(choices)}")
    return out


def _governor(value: Any, path: Path) -> GovernorThresholds:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: 'governor' must be a table ([governor])")
    known = {f.name for f in dataclasses.fields(GovernorThresholds)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown [governor] setting(s) {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(known))}")
    kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    for k, v in kwargs.items():
        default = getattr(GovernorThresholds, k, None)
        if isinstance(default, (int, float)) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{path}: [governor] {k} = {v!r}: expected a number")
    try:
        return GovernorThresholds(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: [governor]: {e}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `--config` and one flag per setting to a parser (values default to None = not given)."""
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML settings file")
    for f in Settings.fields():
        if f.metadata.get("toml_table"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f"{f.metadata['help']} (default: {default}; env ATOLL_{f.name.upper()})"
        if _type_of(f) is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def load(args: argparse.Namespace | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Build Settings from defaults, the TOML file, the environment and parsed flags."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    by_name = {f.name: f for f in Settings.fields()}
    config_file = getattr(args, "config", None) or env.get("ATOLL_CONFIG")
    if config_file:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in by_name:
                raise ConfigError(f"{path}: unknown setting {key!r}; known: {', '.join(sorted(by_name))}")
            if name == "governor":
                values[name] = _governor(value, path)
                continue
            values[name] = _coerce(by_name[name], value, str(path))
    for name, f in by_name.items():
        if f.metadata.get("toml_table"):
            continue
        raw = env.get(f"ATOLL_{name.upper()}")
        if raw is not None:
            values[name] = _coerce(f, raw, f"environment ATOLL_{name.upper()}")
    if args is not None:
        for name, f in by_name.items():
            if f.metadata.get("toml_table"):
                continue
            raw = getattr(args, name, None)
            if raw is not None:
                values[name] = _coerce(f, raw, f"--{name.replace('_', '-')}")
    return Settings(**values)
