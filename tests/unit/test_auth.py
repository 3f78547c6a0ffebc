"""Who may call, sans-I/O: the key store, client addresses, browser origins."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.servers import make_settings
from voxrelay.service.auth import (
    KeyStore,
    OriginPolicy,
    TrustedProxies,
    bearer_token,
    client_key,
    key_id,
)
from voxrelay.service.errors import Unauthorized
from voxrelay.service.logs import redact
from voxrelay.service.settings import ConfigError, load_settings


def test_open_service_needs_no_key() -> None:
    keys = KeyStore(make_settings())
    assert not keys.required and len(keys) == 0
    assert keys.authenticate(None) is None
    assert keys.verify("anything") is None


def test_verify_returns_a_stable_id_that_is_not_the_key() -> None:
    keys = KeyStore(make_settings(api_keys="alpha, beta"))
    assert keys.required and len(keys) == 2
    assert keys.verify("alpha") == key_id("alpha") != keys.verify("beta")
    assert "alpha" not in (keys.verify("alpha") or "")
    assert keys.verify("alph") is None and keys.verify("alphax") is None
    assert keys.verify("") is None and keys.verify(None) is None
    assert keys.authenticate("beta") == key_id("beta")
    with pytest.raises(Unauthorized, match="is required"):
        keys.authenticate(None)
    with pytest.raises(Unauthorized, match="not valid") as wrong:
        keys.authenticate("gamma")
    assert "gamma" not in wrong.value.message


def test_key_file_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# the team's keys\nk-one\n\n  k-two  \n  # k-old\n#k-older\nk#three\n")
    keys = KeyStore(make_settings(api_keys_file=path, api_keys="k-env"))
    assert len(keys) == 4
    assert all(keys.verify(k) for k in ("k-one", "k-two", "k-env", "k#three"))
    assert keys.verify("k-old") is None and keys.verify("k-older") is None
    assert keys.verify("k") is None


def test_key_file_with_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_bytes("\ufeffk-first\r\nk-second\r\n".encode())
    keys = KeyStore(make_settings(api_keys_file=path))
    assert keys.verify("k-first") and keys.verify("k-second")


def test_reloaded_keys_are_redacted_from_logs(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("first-key-123\n")
    keys = KeyStore(make_settings(api_keys_file=path))
    path.write_text("added-by-sighup-456\n")
    assert keys.reload()
    assert (
        redact("token added-by-sighup-456 and first-key-123") == "token [redacted] and [redacted]"
    )


def test_reload_picks_up_new_keys_and_drops_old_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys"
    path.write_text("old-key\n")
    keys = KeyStore(make_settings(api_keys_file=path))
    path.write_text("new-key\nsecond-key\n")
    with caplog.at_level(logging.DEBUG):
        assert keys.reload()
    assert keys.verify("new-key") and keys.verify("second-key")
    assert keys.verify("old-key") is None
    loaded = [r for r in caplog.records if getattr(r, "event", None) == "keys"]
    assert loaded and getattr(loaded[-1], "count", None) == 2
    text = " ".join(r.getMessage() + repr(vars(r)) for r in caplog.records)
    assert "new-key" not in text and "second-key" not in text


def test_reload_keeps_the_keys_when_the_file_is_gone_or_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys"
    path.write_text("k-1\n")
    keys = KeyStore(make_settings(api_keys_file=path))
    path.unlink()
    assert not keys.reload()
    assert keys.verify("k-1")
    # An empty file would open a closed service: refused too.
    path.write_text("# nobody\n")
    assert not keys.reload()
    assert keys.required and keys.verify("k-1")
    assert any("keeping the current" in r.getMessage() for r in caplog.records)


def test_a_missing_or_empty_key_file_fails_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"VOXRELAY_API_KEYS_FILE .* cannot be read"):
        load_settings(api_keys_file=tmp_path / "missing", llm="echo", tts="espeak")
    empty = tmp_path / "empty"
    empty.write_text("# no keys yet\n")
    with pytest.raises(ConfigError, match="holds no keys"):
        load_settings(api_keys_file=empty, llm="echo", tts="espeak")


def test_bad_trusted_proxy_fails_start_up() -> None:
    with pytest.raises(ConfigError, match="VOXRELAY_TRUSTED_PROXIES"):
        load_settings(trusted_proxies="10.0.0.0/8, proxy.local", llm="echo", tts="espeak")
    settings = load_settings(trusted_proxies="10.0.0.0/8, ::1", llm="echo", tts="espeak")
    assert settings.trusted_proxies == ["10.0.0.0/8", "::1"]


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_forwarded_for_is_believed_only_from_trusted_proxies() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "192.0.2.1"])
    # Not from a proxy: the header is the client's own claim and ignored.
    assert proxies.client_ip("198.51.100.9", ["203.0.113.5"]) == "198.51.100.9"
    # From a proxy: the nearest address that is not ours.
    assert proxies.client_ip("10.1.2.3", ["203.0.113.5"]) == "203.0.113.5"
    assert proxies.client_ip("10.1.2.3", ["6.6.6.6, 203.0.113.5, 192.0.2.1"]) == "203.0.113.5"
    assert proxies.client_ip("10.1.2.3", ["6.6.6.6", "203.0.113.5"]) == "203.0.113.5"
    assert proxies.client_ip("10.1.2.3", ["[2001:db8::7]:4711"]) == "2001:db8::7"
    assert proxies.client_ip("10.1.2.3", ["203.0.113.5:8080"]) == "203.0.113.5"
    assert proxies.client_ip("10.1.2.3", []) == "10.1.2.3"
    assert proxies.client_ip("10.1.2.3", ["garbage"]) == "10.1.2.3"
    assert proxies.client_ip("10.1.2.3", ["10.9.9.9"]) == "10.9.9.9"  # all ours
    assert TrustedProxies([]).client_ip("10.1.2.3", ["203.0.113.5"]) == "10.1.2.3"


def test_client_key_groups_ipv6_by_64() -> None:
    assert client_key("203.0.113.5") == "203.0.113.5"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2")
    assert client_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert client_key("::ffff:203.0.113.5") == "203.0.113.5"
    assert client_key("unix-socket") == "unix-socket"


def test_default_origin_policy_is_own_origin_and_no_origin() -> None:
    policy = OriginPolicy([])
    host = "127.0.0.1:8765"
    assert policy.allows(None, host=host, secure=False)
    assert policy.allows("http://127.0.0.1:8765", host=host, secure=False)
    assert policy.allows("HTTP://127.0.0.1:8765/", host=host, secure=False)
    assert not policy.allows("https://127.0.0.1:8765", host=host, secure=False)
    assert policy.allows("https://127.0.0.1:8765", host=host, secure=True)
    assert policy.allows("http://localhost:8765", host="LOCALHOST:8765", secure=False)
    assert policy.allows("http://[::1]:8765", host="[::1]:8765", secure=False)
    assert not policy.allows("http://127.0.0.1:9999", host=host, secure=False)
    assert not policy.allows("https://evil.example", host=host, secure=False)
    assert not policy.allows("null", host=host, secure=False)
    assert not policy.allows("http://127.0.0.1:8765", host=None, secure=False)
    assert not policy.allows("http://[::1", host=host, secure=False)


def test_a_host_name_is_own_origin_only_when_listed() -> None:
    # A rebinding page on evil.example names its own host, its origin matching it.
    policy = OriginPolicy([])
    assert not policy.allows("http://evil.example:8765", host="evil.example:8765", secure=False)
    assert not policy.allows("http://example.com", host="example.com:80", secure=False)
    listed = OriginPolicy([], ["voice.example.com"])
    assert listed.allows("https://Voice.Example.com", host="voice.example.com", secure=True)
    assert listed.allows(
        "http://voice.example.com:8765", host="VOICE.example.com:8765", secure=False
    )
    assert not listed.allows("http://evil.example", host="evil.example", secure=False)
    assert not listed.allows("http://a.voice.example.com", host="a.voice.example.com", secure=False)
    assert listed.allows("http://127.0.0.1:8765", host="127.0.0.1:8765", secure=False)


def test_public_hosts_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXRELAY_PUBLIC_HOSTS", "Voice.Example.com, tts.internal")
    settings = load_settings(llm="echo", tts="espeak")
    assert settings.public_hosts == ["voice.example.com", "tts.internal"]
    for bad in ("voice.example.com:8765", "https://voice.example.com", "a b", "*.example.com"):
        monkeypatch.setenv("VOXRELAY_PUBLIC_HOSTS", bad)
        with pytest.raises(ConfigError, match=r"^invalid VOXRELAY_PUBLIC_HOSTS: .*not a host name"):
            load_settings(llm="echo", tts="espeak")


@pytest.mark.parametrize(
    "entry",
    ["app.example.com", "https://", "https://app.example.com/path", "https://app.example.com:99999",
     "https://user@app.example.com", "https://app.example.com?x=1", "null"],
)  # fmt: skip
def test_an_invalid_allowed_origin_fails_start_up(
    monkeypatch: pytest.MonkeyPatch, entry: str
) -> None:
    monkeypatch.setenv("VOXRELAY_ALLOWED_ORIGINS", f"https://ok.example.com, {entry}")
    with pytest.raises(ConfigError) as failed:
        load_settings(llm="echo", tts="espeak")
    line = str(failed.value)
    assert "\n" not in line
    assert line.startswith("invalid VOXRELAY_ALLOWED_ORIGINS: ") and repr(entry) in line


def test_valid_allowed_origins_start() -> None:
    settings = load_settings(
        allowed_origins="https://app.example.com/, http://localhost:3000, *",
        llm="echo",
        tts="espeak",
    )
    assert len(settings.allowed_origins) == 3


def test_configured_origins_replace_the_own_origin() -> None:
    policy = OriginPolicy(["https://app.example.com", "http://localhost:3000"])
    host = "127.0.0.1:8765"
    assert policy.allows("https://app.example.com", host=host, secure=False)
    assert policy.allows("https://APP.example.com:443", host=host, secure=False)
    assert policy.allows("http://localhost:3000", host=host, secure=False)
    assert not policy.allows("http://127.0.0.1:8765", host=host, secure=False)
    assert not policy.allows("https://app.example.com.evil.example", host=host, secure=False)
    assert policy.allows(None, host=host, secure=False)
    anyone = OriginPolicy(["*"])
    assert anyone.allows("https://evil.example", host=host, secure=False)
    assert anyone.allows("null", host=host, secure=False)
