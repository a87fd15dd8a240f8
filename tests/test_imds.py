"""Spot interruption notices through IMDSv2, against a local server that follows AWS's endpoints."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gpuline.training import imds
from gpuline.training.imds import ImdsClient, ImdsError, SpotNotice, SpotWatcher
from servers import ImdsServer


def test_no_notice_is_none_and_uses_a_token(imds_server: ImdsServer) -> None:
    client = ImdsClient(imds_server.url)
    assert client.spot_notice() is None
    assert imds_server.requests == [("PUT", "/latest/api/token"), ("GET", "/latest/meta-data/spot/instance-action")]


def test_notice_is_parsed(imds_server: ImdsServer) -> None:
    imds_server.schedule_interruption("stop", "2026-11-23T20:00:00Z")
    assert ImdsClient(imds_server.url).spot_notice() == SpotNotice("stop", "2026-11-23T20:00:00Z")


def test_token_is_reused_then_refreshed_after_401(imds_server: ImdsServer) -> None:
    client = ImdsClient(imds_server.url)
    client.spot_notice()
    client.spot_notice()
    assert [m for m, _ in imds_server.requests].count("PUT") == 1
    imds_server.expire_tokens()
    assert client.spot_notice() is None
    assert [m for m, _ in imds_server.requests].count("PUT") == 2


def test_unreachable_endpoint_raises() -> None:
    with pytest.raises(ImdsError, match="unreachable"):
        ImdsClient("http://127.0.0.1:9", timeout_s=0.5).spot_notice()


def test_a_refused_token_request_raises(imds_server: ImdsServer) -> None:
    client = ImdsClient(imds_server.url + "/wrong-root")
    with pytest.raises(ImdsError, match=r"token request .* answered 404"):
        client.spot_notice()


def test_watcher_calls_back_once(imds_server: ImdsServer) -> None:
    seen: list[SpotNotice] = []
    called = threading.Event()

    def on_notice(notice: SpotNotice) -> None:
        seen.append(notice)
        called.set()

    watcher = SpotWatcher(ImdsClient(imds_server.url), on_notice, interval_s=0.02, log=lambda _: None)
    watcher.start()
    imds_server.schedule_interruption()
    assert called.wait(10)
    watcher.stop()
    assert seen == [SpotNotice("terminate", "2030-01-01T00:00:00Z")] and watcher.notice == seen[0]


def test_watcher_complains_once_about_an_unreachable_endpoint() -> None:
    lines: list[str] = []
    watcher = SpotWatcher(
        ImdsClient("http://127.0.0.1:9", timeout_s=0.2), lambda n: None, interval_s=0.01, log=lines.append
    )
    watcher.start()
    threading.Event().wait(0.3)
    watcher.stop()
    assert len(lines) == 1 and "will keep trying" in lines[0]


def test_endpoint_from_env(tmp_path: Path) -> None:
    assert (
        imds.endpoint_from_env({"GPULINE_IMDS_ENDPOINT": "http://127.0.0.1:1234/"}, tmp_path) == "http://127.0.0.1:1234"
    )
    assert imds.endpoint_from_env({"GPULINE_IMDS_ENDPOINT": "off"}, tmp_path) is None
    assert imds.endpoint_from_env({}, tmp_path) is None  # not EC2
    tag = tmp_path / "devices/virtual/dmi/id/board_asset_tag"
    tag.parent.mkdir(parents=True)
    tag.write_text("i-0123456789abcdef0\n")
    assert imds.endpoint_from_env({}, tmp_path) == imds.DEFAULT_ENDPOINT
