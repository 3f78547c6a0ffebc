"""voxrelay's configuration: one pydantic-settings object, built once at start-up.

Values come from ``VOXRELAY_*`` environment variables (and ``OPENAI_API_KEY`` /
``OPENAI_BASE_URL`` as the openai SDK reads them), a ``.env`` file, and CLI flags of
``voxrelay serve`` (``--grpc-port 0``), in rising precedence. No other module reads
the environment.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, CliSuppress, NoDecode, SettingsConfigDict

from .model import AudioFormat

__all__ = ["ConfigError", "Settings", "load_settings", "normalise_origin", "read_list_file"]

log = logging.getLogger(__name__)

ChatProviderName = Literal["openai", "echo", "realtime"]
SpeechProviderName = Literal["openai", "espeak"]
CommaList = Annotated[list[str], NoDecode]


class ConfigError(Exception):
    """A setting is invalid; the message is one line naming the variable."""


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def read_list_file(path: Path) -> list[str]:
    """Read one entry per line; blank lines and lines starting with ``#`` are skipped.

    Only a ``#`` that begins a line (after spaces) starts a comment: a key may hold one.
    A UTF-8 byte-order mark, which some editors write, is not part of the first entry.
    """
    entries = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        entry = line.strip()
        if entry and not entry.startswith("#"):
            entries.append(entry)
    return entries


_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def normalise_origin(origin: str) -> str | None:
    """Return ``scheme://host:port`` in lower case, or None for what is not an origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if not scheme or not host:
        return None
    port = port or _DEFAULT_PORTS.get(scheme)
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}:{port}"


def _is_origin(entry: str) -> bool:
    """Say whether *entry* is an origin as a browser sends it: scheme, host, port, no more."""
    if normalise_origin(entry) is None:
        return False
    parts = urlsplit(entry)
    return (
        parts.netloc.rpartition("@")[1] == ""
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
    )


#: A DNS host name: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(
    r"(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?",
    re.IGNORECASE,
)


class Settings(BaseSettings):
    """Serve voxrelay; every option is also an environment variable or a .env line."""

    model_config = SettingsConfigDict(
        use_attribute_docstrings=True,
        cli_hide_none_type=True,
        cli_show_env_vars=True,
        env_prefix="VOXRELAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_exit_on_error=False,
    )

    # Listeners
    host: str = "127.0.0.1"
    """bind address of all listeners"""
    grpc_port: int = Field(50051, ge=0, le=65535)
    """gRPC port (0 = pick a free one and log it)"""
    ws_port: int = Field(8765, ge=0, le=65535)
    """WebSocket + small HTTP port (0 = pick)"""
    metrics_port: int = Field(9464, ge=0, le=65535)
    """Prometheus /metrics port (0 = pick)"""
    http_port: int | None = Field(8080, ge=0, le=65535)
    """OpenAI-compatible speech API port (0 = pick, off = no such door)"""
    workers: int = Field(1, ge=0, le=256)
    """worker processes sharing the ports (0 = one per core)"""

    # Providers
    llm: ChatProviderName | None = None
    """chat provider: openai, echo or realtime; unset: openai with a key, else echo"""
    tts: SpeechProviderName | None = None
    """speech engine: openai or espeak; unset: openai with a key, else espeak"""
    openai_api_key: CliSuppress[SecretStr | None] = Field(
        None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    """the OpenAI key (environment only: never on a command line)"""
    openai_base_url: str | None = Field(
        None, validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url")
    )
    """an OpenAI-compatible server for both stages"""
    llm_base_url: str | None = None
    """the chat (or realtime) upstream only, e.g. a local Ollama"""
    llm_api_key: CliSuppress[SecretStr | None] = None
    """the chat (or realtime) upstream's key (env only)"""
    tts_base_url: str | None = None
    """the speech upstream only, e.g. Kokoro or LocalAI"""
    tts_api_key: CliSuppress[SecretStr | None] = None
    """the speech upstream's key (env only)"""
    llm_model: str = "gpt-4o-mini"
    """chat model"""
    tts_model: str = "gpt-4o-mini-tts"
    """speech model"""
    realtime_model: str = "gpt-realtime-2.1-mini"
    """model of the realtime provider"""
    #: the Realtime API takes 1–4096 (audio tokens included); 0 asks for its maximum.
    realtime_max_output_tokens: int = Field(4096, ge=0, le=4096)
    """realtime output cap per reply, audio tokens included (0 = max)"""
    voice: str | None = None
    """default voice; unset: alloy (openai, realtime), en-us (espeak)"""
    format: AudioFormat = AudioFormat.MP3
    """default audio format: pcm, wav, mp3, opus, flac, aac, mulaw or alaw"""

    espeak_workers: int = Field(0, ge=0, le=256)
    """espeak worker processes (0 = one per core)"""

    # Pipeline
    lookahead_segments: int = Field(2, ge=1, le=16)
    """segments synthesised at once (the one playing + look-ahead)"""
    trim_silence: bool = True
    """cut the engines' silence: each segment starts at its sound and ends in one pause"""
    segment_pause_ms: int = Field(250, ge=0, le=5000)
    """the pause that ends each segment when trim_silence is on"""
    memory_turns: int = Field(8, ge=0)
    """turns a WebSocket connection remembers in chat mode"""
    normalize: bool = True
    """make text speakable: markdown as plain text, no emoji, numbers as words"""
    lexicon_file: Path | None = None
    """lines 'word<TAB>spoken form', applied after normalization (reloaded on SIGHUP)"""
    cache_mb: float = Field(64, ge=0)
    """phrase cache: MB of repeated segments' audio kept to replay (0 = off)"""
    cache_redis_mb: float = Field(256, ge=0)
    """phrase cache's own bound in Redis, MB, when VOXRELAY_REDIS_URL is set (0 = not shared)"""
    cache_redis_ttl_s: float = Field(86400, gt=0)
    """a phrase in Redis unused this long expires"""

    # Logging
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """debug, info, warning or error"""
    log_text: bool = False
    """log user text and replies (off: never)"""

    # Auth and origins
    api_keys: CliSuppress[CommaList] = Field(default_factory=list)
    """comma-separated caller keys (unset = open; env only)"""
    api_keys_file: Path | None = None
    """a file of caller keys, one per line (reloaded on SIGHUP)"""
    allowed_origins: CommaList = Field(default_factory=list)
    """browser origins allowed on the WebSocket (default: own origin)"""
    public_hosts: CommaList = Field(default_factory=list)
    """host names (no port) that count as this server's own origin besides IPs and localhost"""
    #: Proxies whose X-Forwarded-For the WebSocket door believes (IPs or CIDRs).
    trusted_proxies: CommaList = Field(default_factory=list)
    """IPs/CIDRs whose X-Forwarded-For is believed"""

    # Limits
    max_input_chars: int = Field(4096, ge=1)
    """longest text accepted; longer is refused, never truncated"""
    max_instructions_chars: int = Field(1000, ge=0)
    """longest instructions accepted (0 = off)"""
    max_stream_audio_s: float = Field(600, ge=0)
    """seconds of audio one stream may make (0 = off)"""
    max_stream_input_chars: int = Field(100_000, ge=0)
    """characters one streamed input may carry in all (0 = off)"""
    input_idle_s: float = Field(20, ge=0)
    """a streamed input with no text or flush this long ends as if the caller ended it (0 = off)"""
    rate_limit_per_min: int = Field(60, ge=0)
    """requests per minute per caller (0 = off)"""
    chars_per_min: int = Field(20000, ge=0)
    """input characters per minute per caller (0 = off)"""
    max_streams_per_key: int = Field(4, ge=0)
    """concurrent streams per caller (0 = off)"""
    max_streams: int = Field(256, ge=0)
    """concurrent streams in all (0 = off)"""
    max_connections: int = Field(4096, ge=0)
    """WebSocket connections in all (0 = off)"""
    max_connections_per_ip: int = Field(64, ge=0)
    """WebSocket connections per client address (0 = off)"""
    ws_max_message_bytes: int = Field(65536, ge=0)
    """largest frame or gRPC message accepted (0 = off)"""
    idle_timeout_s: float = Field(300, ge=0)
    """close a WebSocket silent this long (0 = never)"""
    send_stall_s: float = Field(30, ge=0)
    """drop a client that stops reading this long (0 = never)"""

    # Timeouts and resilience
    llm_timeout_s: float = Field(30, ge=0)
    """chat stage budget for its first byte and any later gap"""
    tts_timeout_s: float = Field(30, ge=0)
    """speech stage budget for its first byte and any later gap"""
    connect_timeout_s: float = Field(5, gt=0)
    """upstream connect timeout"""
    upstream_retries: int = Field(2, ge=0, le=10)
    """retries before a segment's first byte"""
    max_reply_tokens: int = Field(512, ge=0)
    """the LLM's max_tokens, a cost guard (0 = off)"""
    breaker_failures: int = Field(5, ge=0)
    """consecutive upstream failures that open its breaker (0 = off)"""
    breaker_cooldown_s: float = Field(10, ge=0)
    """how long an open breaker refuses calls"""
    drain_s: float = Field(20, ge=0)
    """on SIGTERM, how long streams in flight may finish"""

    # Transport security and extras
    tls_cert: Path | None = None
    """PEM certificate: both doors serve TLS"""
    tls_key: Path | None = None
    """PEM private key of the certificate"""
    grpc_reflection: bool = False
    """gRPC server reflection (for development)"""

    # More than one process
    redis_url: str | None = None
    """redis://[user:password@]host:port/db (or rediss://, unix://): limits shared by replicas"""
    redis_failure: Literal["open", "closed"] = "open"
    """when Redis cannot be reached: open (per-process limits) or closed (refuse)"""

    @field_validator(
        "api_keys", "allowed_origins", "public_hosts", "trusted_proxies", mode="before"
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for entry in value:
            if entry != "*" and not _is_origin(entry):
                raise ValueError(
                    f"{entry!r} is not an origin: write scheme://host[:port]"
                    " (e.g. https://app.example.com), or * for any"
                )
        return value

    @field_validator("public_hosts")
    @classmethod
    def _host_names(cls, value: list[str]) -> list[str]:
        for entry in value:
            if _HOST_NAME.fullmatch(entry) is None:
                raise ValueError(f"{entry!r} is not a host name (no scheme, no port)")
        return [entry.lower() for entry in value]

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR") from None
        return value

    @field_validator(
        "llm", "tts", "voice", "llm_base_url", "tts_base_url", "openai_base_url", mode="before"
    )
    @classmethod
    def _blank_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("tts", mode="before")
    @classmethod
    def _speech_engine(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "realtime":
            raise ValueError(
                "realtime is a speaking model, not a speech engine: set VOXRELAY_LLM=realtime"
                " (it replaces the TTS stage in chat mode); VOXRELAY_TTS (openai or espeak)"
                " still speaks speak mode"
            )
        return value

    @field_validator("http_port", mode="before")
    @classmethod
    def _off_is_none(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() == "off":
            return None
        return value

    @field_validator("redis_url", mode="before")
    @classmethod
    def _redis_url(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value.strip():
            return None
        # The URL may hold a password: the message names the fault, never the URL.
        parsed = urlsplit(value.strip())
        if parsed.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("it must start with redis://, rediss:// or unix://")
        try:
            parsed.port  # noqa: B018 - parsing the port is the check
        except ValueError:
            raise ValueError("its port is not a number from 0 to 65535") from None
        if parsed.scheme == "unix":
            if not parsed.path:
                raise ValueError("a unix:// URL needs a socket path")
            return value.strip()
        if not parsed.hostname:
            raise ValueError("it names no host")
        db = parsed.path.strip("/")
        if db and not db.isdigit():
            raise ValueError("its path must be a database number")
        return value.strip()

    @field_validator("redis_failure", mode="before")
    @classmethod
    def _lower_policy(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("VOXRELAY_TLS_CERT and VOXRELAY_TLS_KEY must be set together")
        self.check_key_file()
        if self.lexicon_file is not None:
            from .lexicon import Lexicon, LexiconError  # a lexicon is read only when set

            try:
                Lexicon.load(self.lexicon_file)
            except (OSError, LexiconError) as exc:
                raise ValueError(f"VOXRELAY_LEXICON_FILE: {exc}") from None
        if self.chat_provider in ("openai", "realtime") and self.llm_credentials[0] is None:
            raise ValueError(
                f"VOXRELAY_LLM={self.chat_provider} needs OPENAI_API_KEY or VOXRELAY_LLM_API_KEY"
                " (or VOXRELAY_LLM_BASE_URL for a local server)"
            )
        if self.speech_provider == "openai" and self.tts_credentials[0] is None:
            raise ValueError(
                "VOXRELAY_TTS=openai needs OPENAI_API_KEY or VOXRELAY_TTS_API_KEY"
                " (or VOXRELAY_TTS_BASE_URL for a local server)"
            )
        return self

    # Derived values

    @property
    def has_openai_key(self) -> bool:
        return self.openai_api_key is not None and bool(self.openai_api_key.get_secret_value())

    @property
    def chat_provider(self) -> ChatProviderName:
        """The chat provider in force: the configured one, else openai with a key, else echo."""
        if self.llm is not None:
            return self.llm
        return "openai" if self.has_openai_key or self.llm_api_key else "echo"

    @property
    def speech_provider(self) -> SpeechProviderName:
        """The speech engine in force: the configured one, else openai with a key, else espeak."""
        if self.tts is not None:
            return self.tts
        return "openai" if self.has_openai_key or self.tts_api_key else "espeak"

    def _credentials(
        self, key: SecretStr | None, base_url: str | None
    ) -> tuple[str | None, str | None]:
        api_key = key or self.openai_api_key
        url = base_url or self.openai_base_url
        secret = api_key.get_secret_value() if api_key is not None else ""
        if not secret and url:
            # Local servers (Ollama, vLLM) need no key, but the SDK insists on one.
            secret = "unused"
        return (secret or None), url

    @property
    def llm_credentials(self) -> tuple[str | None, str | None]:
        """(api key, base URL) of the chat upstream."""
        return self._credentials(self.llm_api_key, self.llm_base_url)

    @property
    def tts_credentials(self) -> tuple[str | None, str | None]:
        """(api key, base URL) of the speech upstream."""
        return self._credentials(self.tts_api_key, self.tts_base_url)

    def all_api_keys(self) -> list[str]:
        """The configured caller keys: the list setting plus the key file's entries."""
        keys = list(self.api_keys)
        if self.api_keys_file is not None:
            keys += read_list_file(self.api_keys_file)
        return keys

    def check_key_file(self) -> None:
        """Raise ValueError unless the API key file, when set, can be read and holds a key.

        A key file that cannot be read must not leave the service open: checked when the
        settings are built, and again by each worker process as it starts.
        """
        if self.api_keys_file is None:
            return
        try:
            file_keys = read_list_file(self.api_keys_file)
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or type(exc).__name__
            raise ValueError(
                f"VOXRELAY_API_KEYS_FILE {str(self.api_keys_file)!r} cannot be read: {reason}"
            ) from None
        if not file_keys and not self.api_keys:
            raise ValueError(
                f"VOXRELAY_API_KEYS_FILE {str(self.api_keys_file)!r} holds no keys"
                " (unset it to run open)"
            )

    def worker_count(self) -> int:
        """How many worker processes to run: ``workers``, or one per usable core for 0."""
        if self.workers:
            return self.workers
        return (
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1
        )

    def describe_choice(self) -> dict[str, str]:
        """Say which providers were chosen and why (for the start-up log)."""
        key = "an API key is set" if self.has_openai_key else "no API key is set"
        return {
            "llm": self.chat_provider,
            "llm_reason": "VOXRELAY_LLM" if self.llm else key,
            "tts": self.speech_provider,
            "tts_reason": "VOXRELAY_TTS" if self.tts else key,
        }


#: Settings whose value may carry a password: a bad one is named, never echoed.
SECRET_BEARING = frozenset({"VOXRELAY_REDIS_URL"})


def _env_name(loc: tuple[int | str, ...]) -> str:
    if not loc:
        return "configuration"
    name = str(loc[0])
    if name.isupper():
        return name
    if name in ("openai_api_key", "openai_base_url"):
        return name.upper()
    return f"VOXRELAY_{name.upper()}"


def load_settings(cli_args: list[str] | None = None, **overrides: Any) -> Settings:
    """Build the settings, raising :class:`ConfigError` with one clear line on a bad value."""
    try:
        if cli_args is not None:
            return Settings(
                _cli_parse_args=cli_args,  # type: ignore[call-arg]
                _cli_prog_name="voxrelay serve",
                **overrides,
            )
        return Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "value_error" and not err["loc"]:
            raise ConfigError(message) from None
        value = err.get("input")
        name = _env_name(err["loc"])
        secret = "key" in name.lower() or name in SECRET_BEARING
        shown = "" if secret else f" (got {value!r})"
        raise ConfigError(f"invalid {name}: {message}{shown}") from None
    except Exception as exc:  # the CLI source raises argparse/SettingsError on bad flags
        raise ConfigError(str(exc).splitlines()[0]) from None
