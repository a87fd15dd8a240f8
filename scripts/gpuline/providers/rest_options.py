"""``resources.options`` for the rest provider: where the cloud's API is, how it authenticates, and
how its requests and answers are spelled (endpoints, field paths, status words, error codes)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpuline import contract

# Where the API token is read from unless resources.options.token_env names another variable.
TOKEN_ENV = contract.REST_TOKEN


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Endpoints(_Strict):
    create: str = "POST /v1/instances"
    get: str = "GET /v1/instances/{id}"
    delete: str = "DELETE /v1/instances/{id}"
    list: str = "GET /v1/instances"


class ResponseFields(_Strict):
    """Dotted paths into the cloud's JSON answers ("" = the body itself)."""

    item: str = Field(default="", description="Where the instance is in create/get answers.")
    items: str = Field(default="instances", description="Where the list is in list answers.")
    id: str = "id"
    status: str = "status"
    address: str = "ip"
    tags: str | None = Field(default="tags", description="null when the cloud keeps no tags (names are used).")
    name: str = "name"
    instance_type: str = "instance_type"
    region: str = "region"
    created_at: str = "created_at"
    error_code: str = "error.code"
    error_message: str = "error.message"


class RequestFields(_Strict):
    """Field names of the create body; null leaves a field out."""

    name: str | None = "name"
    instance_type: str | None = "instance_type"
    gpu_type: str | None = None
    gpu_count: str | None = None
    image: str | None = "image"
    region: str | None = "region"
    tags: str | None = "tags"
    user_data: str | None = "user_data"


class StatusWords(_Strict):
    pending: list[str] = ["pending", "creating", "provisioning", "booting", "starting", "queued"]
    running: list[str] = ["running", "active", "ready"]
    stopping: list[str] = ["stopping", "terminating", "deleting"]
    stopped: list[str] = ["stopped", "paused"]
    terminated: list[str] = ["terminated", "deleted", "destroyed", "killed"]


class RestOptions(_Strict):
    """``resources.options`` for the rest provider."""

    profile: Literal["generic"] = "generic"
    base_url: str = Field(description="Root URL of the cloud's API, e.g. https://api.example-cloud.com.")
    token_env: str = Field(default=TOKEN_ENV, description="Env var holding the API token.")
    auth_header: str = "Authorization"
    auth_scheme: str = Field(default="Bearer", description='Prefix before the token; "" sends it bare.')
    image: str | None = Field(default=None, description="Default: resources.image.")
    region: str | None = Field(default=None, description="Default: resources.region.")
    instance_types: list[str] | None = Field(default=None, description="Types to fail over across, in order.")
    regions: list[str] = Field(default_factory=list, description="Regions to fail over across.")
    endpoints: Endpoints = Field(default_factory=Endpoints)
    fields: ResponseFields = Field(default_factory=ResponseFields)
    request_fields: RequestFields = Field(default_factory=RequestFields)
    status_words: StatusWords = Field(default_factory=StatusWords)
    capacity_codes: list[str] = ["insufficient-capacity", "insufficient_capacity", "InsufficientCapacity"]
    quota_codes: list[str] = ["quota-exceeded", "quota_exceeded", "QuotaExceeded"]
    extra_body: dict[str, Any] = Field(default_factory=dict)
    send_user_data: bool = True
    startup_script: str = ""
    timeout_s: float = Field(default=30.0, gt=0)
    retries: int = Field(default=3, ge=0, le=10)
    backoff_base_s: float = Field(default=1.0, ge=0)


PROFILES: dict[str, dict[str, Any]] = {"generic": {}}
