"""A generic GPU cloud with an instance API: create, get, delete, list, over JSON and a bearer token.

Many GPU clouds expose the same four calls under different names. A small config (endpoints, the
auth header, field names, status words: :mod:`gpuline.providers.rest_options`) adapts this provider
to one; the built-in ``generic`` profile is ``POST /v1/instances``, ``GET /v1/instances/{id}``,
``DELETE /v1/instances/{id}`` and ``GET /v1/instances`` with ``{"instances": [...]}``.

The API token is read from the environment variable named in ``token_env`` and never printed;
``secrets()`` hands it to the caller to mask. A create is sent with an ``Idempotency-Key`` (the lease
id), and if its answer is lost the instance list is searched for the lease before trying again, so a
retry never buys two.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gpuline.errors import ConfigError, GpulineError, InfraError, NotFoundError
from gpuline.providers.base import TAG_LEASE_ID, TAG_MANAGED, LeaseRequest, Machine, MachineState, still_running
from gpuline.providers.billing import BilledSpan
from gpuline.providers.failover import Backoff, Candidate, Refusal, first_that_launches
from gpuline.providers.options import parse_options
from gpuline.providers.rest_http import (
    HttpError,
    Transport,
    get_path,
    parse_body,
    parse_when,
    put_path,
    str_or_none,
    urllib_transport,
)
from gpuline.providers.rest_options import PROFILES, RestOptions
from gpuline.providers.testhooks import pause_at
from gpuline.providers.userdata import render_user_data

__all__ = ["NAME_PREFIX", "HttpError", "RestOptions", "RestProvider", "instance_name"]


class RestProvider:
    name = "rest"
    max_nodes = 1  # one instance per lease

    def __init__(
        self,
        project_dir: Path,
        options: dict[str, Any] | None = None,
        *,
        transport: Transport | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.project_dir = project_dir
        raw = dict(options or {})
        profile = PROFILES.get(str(raw.get("profile", "generic")), {})
        self.options = parse_options(RestOptions, {**profile, **raw}, "rest")
        self._transport = transport or urllib_transport
        self._backoff = backoff or Backoff(base_s=self.options.backoff_base_s, retries=self.options.retries)
        self._token: str | None = None

    # ------------------------------------------------------------ HTTP

    def secrets(self) -> list[str]:
        """The API token, so the caller can mask it before any call sends it."""
        token = self._read_token()
        return [token] if token else []

    def _read_token(self) -> str:
        if self._token is None:
            self._token = os.environ.get(self.options.token_env, "").strip() or None
        return self._token or ""

    def _auth(self) -> dict[str, str]:
        token = self._read_token()
        if not token:
            name = self.options.token_env
            raise ConfigError(
                f"the rest provider reads its API token from ${name}, which is not set",
                hint=f"add the token as a secret and pass it as env {name} (or set resources.options.token_env)",
            )
        scheme = self.options.auth_scheme.strip()
        return {self.options.auth_header: f"{scheme} {token}" if scheme else token}

    def call(
        self,
        endpoint: str,
        *,
        ident: str = "",
        body: dict[str, Any] | None = None,
        extra: dict[str, str] | None = None,
    ) -> Any:
        """One API call, retried with backoff on throttling and server errors; HttpError otherwise."""
        method, _, template = endpoint.partition(" ")
        path = template.replace("{id}", urllib.parse.quote(ident, safe=""))
        url = self.options.base_url.rstrip("/") + path
        headers = {"Accept": "application/json", "User-Agent": "gpuline", **self._auth(), **(extra or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        attempt = 0
        while True:
            try:
                status, raw = self._transport(method, url, headers, data, self.options.timeout_s)
            except OSError as exc:
                if attempt >= self.options.retries:
                    raise InfraError(
                        f"{method} {path}: {type(exc).__name__}: {exc}", hint="check resources.options.base_url"
                    ) from None
                self._backoff.wait(attempt)
                attempt += 1
                continue
            parsed = parse_body(raw)
            if status in (429, 502, 503, 504) and attempt < self.options.retries and not self._capacity_error(parsed):
                self._backoff.wait(attempt)
                attempt += 1
                continue
            if status >= 400:
                raise HttpError(status, parsed, method, path)
            return parsed

    # ------------------------------------------------------------ provision

    def provision(self, request: LeaseRequest) -> Machine:
        image = self.options.image or request.spec.resources.image
        if not image:
            raise ConfigError(
                "the rest provider needs an image", hint="set resources.image (or resources.options.image)"
            )
        candidates = self._candidates(request)

        def launch(candidate: Candidate) -> Machine:
            return self._create(request, candidate, image)

        try:
            # Throttling was already retried with backoff inside call(): fail over at once after that.
            no_more_retries = Backoff(retries=0)
            launched = first_that_launches(candidates, launch, self._classify, backoff=no_more_retries)
        except HttpError as exc:
            raise self._as_error(exc, "creating an instance") from None
        machine = launched.value
        machine.failures = [f.as_dict() for f in launched.failures]
        machine.runner_label = request.runner.label if request.runner else None
        return machine

    def _candidates(self, request: LeaseRequest) -> list[Candidate]:
        types = self.options.instance_types or [request.instance_type]
        regions = self.options.regions or [self.options.region or request.region or ""]
        return [Candidate(t, request.lane, zone=r) for t in types for r in regions]

    def _create(self, request: LeaseRequest, candidate: Candidate, image: str) -> Machine:
        rf = self.options.request_fields
        tags = {**request.tags, TAG_MANAGED: "true"}
        body: dict[str, Any] = dict(self.options.extra_body)
        values: dict[str | None, Any] = {
            rf.name: instance_name(request.lease_id),
            rf.instance_type: candidate.instance_type,
            rf.gpu_type: request.spec.resources.gpu_type,
            rf.gpu_count: request.spec.resources.gpu_count,
            rf.image: image,
            rf.region: candidate.zone or None,
            rf.tags: tags,
        }
        if self.options.send_user_data and rf.user_data:
            values[rf.user_data] = render_user_data(request, startup_script=self.options.startup_script)
        for key, value in values.items():
            if key and value not in (None, ""):
                put_path(body, key, value)
        try:
            answer = self.call(self.options.endpoints.create, body=body, extra={"Idempotency-Key": request.lease_id})
        except HttpError as exc:
            if (exc.status >= 500 or exc.status == 429) and not self._capacity_error(exc.body):
                # The answer may be lost while the instance exists: adopt it rather than buy a second.
                found = self._find_by_lease(request.lease_id)
                if found is not None:
                    return found
            raise
        except InfraError:
            found = self._find_by_lease(request.lease_id)
            if found is not None:
                return found
            raise
        machine = self._machine(get_path(answer, self.options.fields.item))
        machine.instance_type = machine.instance_type or candidate.instance_type
        machine.lane = candidate.lane
        machine.region = machine.region or candidate.zone
        machine.launched_at = machine.launched_at or datetime.now(UTC)
        # The cloud may not echo tags: the lease's own tags are the truth for this machine.
        machine.tags = {**tags, **machine.tags}
        return machine

    def _find_by_lease(self, lease_id: str) -> Machine | None:
        try:
            machines = self.list_owned()
        except GpulineError:
            return None
        return next((m for m in machines if m.lease_id == lease_id), None)

    def _capacity_error(self, body: Any) -> bool:
        code = str(get_path(body, self.options.fields.error_code) or "")
        return code in self.options.capacity_codes or code in self.options.quota_codes

    def _classify(self, exc: Exception) -> Refusal | None:
        if not isinstance(exc, HttpError):
            return None
        code = str(get_path(exc.body, self.options.fields.error_code) or "")
        message = str(get_path(exc.body, self.options.fields.error_message) or exc)
        if code in self.options.capacity_codes:
            return Refusal("capacity", code, message)
        if code in self.options.quota_codes:
            return Refusal("quota", code, message)
        if exc.status == 429:
            return Refusal("throttling", "429", message)
        if exc.status == 503:
            return Refusal("capacity", code or "503", message)
        return None

    # ------------------------------------------------------------ describe, release, list

    def describe(self, instance_id: str) -> Machine:
        try:
            answer = self.call(self.options.endpoints.get, ident=instance_id)
        except HttpError as exc:
            if exc.status == 404:
                raise NotFoundError(f"rest instance {instance_id} does not exist") from None
            raise self._as_error(exc, f"reading instance {instance_id}") from None
        return self._machine(get_path(answer, self.options.fields.item))

    def release(self, instance_id: str) -> bool:
        machine = still_running(self, instance_id)
        if machine is None:
            return False
        pause_at("release")
        try:
            self.call(self.options.endpoints.delete, ident=instance_id)
        except HttpError as exc:
            if exc.status == 404:
                return False
            raise self._as_error(exc, f"deleting instance {instance_id}") from None
        return True

    def billed_span(self, instance_id: str) -> BilledSpan | None:
        """The cloud's ``created_at`` for an instance it reports ended. Its API reports no stop time
        and no bill, so the meter is taken to stop when teardown saw it ended."""
        try:
            machine = self.describe(instance_id)
        except NotFoundError:
            return None
        if machine.state != "terminated" or machine.launched_at is None:
            return None
        return BilledSpan(start=machine.launched_at)

    def list_owned(self) -> list[Machine]:
        try:
            answer = self.call(self.options.endpoints.list)
        except HttpError as exc:
            raise self._as_error(exc, "listing instances") from None
        items = get_path(answer, self.options.fields.items)
        if not isinstance(items, list):
            raise InfraError(
                f"the instance list has no list at {self.options.fields.items!r}",
                hint="set resources.options.fields.items to where the cloud puts the list",
            )
        machines = [self._machine(item) for item in items if isinstance(item, dict)]
        return [m for m in machines if m.tags.get(TAG_MANAGED) == "true" and m.state != "terminated"]

    # ------------------------------------------------------------ mapping

    def _machine(self, item: Any) -> Machine:
        if not isinstance(item, dict):
            raise InfraError(
                "the cloud answered without an instance object", hint="check resources.options.fields.item"
            )
        f = self.options.fields
        ident = get_path(item, f.id)
        if ident in (None, ""):
            raise InfraError(f"the instance has no id at {f.id!r}", hint="set resources.options.fields.id")
        raw_tags = get_path(item, f.tags) if f.tags else None
        tags = {str(k): str(v) for k, v in raw_tags.items()} if isinstance(raw_tags, dict) else {}
        name = str(get_path(item, f.name) or "")
        if not tags and name.startswith(NAME_PREFIX):
            # A cloud without tags: the name carries the lease, the ledger knows the rest.
            tags = {TAG_MANAGED: "true", TAG_LEASE_ID: "lease-" + name.removeprefix(NAME_PREFIX)}
        return Machine(
            instance_id=str(ident),
            provider=self.name,
            state=self._state(str(get_path(item, f.status) or "")),
            tags=tags,
            launched_at=parse_when(get_path(item, f.created_at)),
            address=str_or_none(get_path(item, f.address)),
            instance_type=str(get_path(item, f.instance_type) or ""),
            region=str(get_path(item, f.region) or ""),
        )

    def _state(self, word: str) -> MachineState:
        w = self.options.status_words
        lowered = word.lower()
        table: list[tuple[list[str], MachineState]] = [
            (w.running, "running"),
            (w.pending, "pending"),
            (w.stopping, "stopping"),
            (w.stopped, "stopped"),
            (w.terminated, "terminated"),
        ]
        for words, state in table:
            if lowered in (x.lower() for x in words):
                return state
        return "unknown"

    def _as_error(self, exc: HttpError, doing: str) -> GpulineError:
        message = str(get_path(exc.body, self.options.fields.error_message) or "")[:300]
        text = f"{doing}: HTTP {exc.status}" + (f" ({message})" if message else "")
        if exc.status in (401, 403):
            return InfraError(text, hint=f"check the token in ${self.options.token_env} and its permissions")
        if exc.status in (400, 404, 422):
            return ConfigError(text, hint="check resources.options (endpoints, fields, image, instance type)")
        return InfraError(text, hint="the cloud's API failed; retry later")


NAME_PREFIX = "gpuline-"


def instance_name(lease_id: str) -> str:
    return NAME_PREFIX + lease_id.removeprefix("lease-")
