"""The one `Settings` object of msknode.

Values come from environment variables prefixed ``MSKNODE_`` and, optionally, a TOML
file (``msknode --config FILE`` or ``MSKNODE_CONFIG``). Environment variables win
over the file. Settings are validated once at start and then passed down; there is
no module-level settings instance.

Operators script against these names: keep them.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as _SourceError

from node.errors import SettingsError

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_ROUTING_RULES = PACKAGE_DIR / "intake" / "routing_rules.toml"
DEFAULT_TRIAGE_POLICY = Path(__file__).resolve().parent.parent / "worklists" / "triage_policy.toml"

# A UID root for objects msknode creates. Sites set their own (MSKNODE_UID_ROOT);
# this default is only unique to msknode installations.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.10.1447."

# The default of a setting that `Settings._derived` fills in: None until then, and the field's
# type (str) once the settings are validated.
_DERIVED: Any = None

_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")
_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")


#: words found in the placeholders of examples and tutorials: a key holding one was copied, not generated
_PLACEHOLDER_WORDS = (
    "replace",
    "change",
    "placeholder",
    "example",
    "secret",
    "password",
    "random",
    "generator",
    "insecure",
    "default",
    "msknode",
    "django",
)
#: the bits a secret key must carry at least (32 bytes)
SECRET_KEY_MIN_BITS = 256
_BASE64 = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/-_=")


def secret_key_problem(key: str) -> str | None:
    """Why `key` cannot sign sessions (a well-known placeholder, or under 32 bytes of entropy), or None.

    The entropy is estimated from the length and the character classes the key uses (lower case,
    upper case, digits, other), e.g. ``python -c 'import secrets; print(secrets.token_urlsafe(32))'``
    (43 characters) or ``openssl rand -hex 32`` (64 characters) pass; a repeated or dictionary-like
    string does not.
    """
    import math

    low = key.lower()
    if any(word in low for word in _PLACEHOLDER_WORDS):
        return "the secret key is a placeholder; leave it empty (one is generated) or use 32 random bytes"
    chars = set(key)
    if chars <= set("0123456789abcdef") or chars <= set("0123456789ABCDEF"):
        alphabet = 16  # hex
    elif chars <= _BASE64:
        alphabet = 64  # base64 or its URL-safe variant
    else:
        alphabet = (
            26 * any(c.islower() for c in key)
            + 26 * any(c.isupper() for c in key)
            + 10 * any(c.isdigit() for c in key)
            + 33 * any(not c.isalnum() for c in key)
        )
    bits = len(key) * math.log2(max(alphabet, 2))
    if bits < SECRET_KEY_MIN_BITS or len(chars) < 12:
        return (
            f"the secret key carries at most {bits if len(chars) >= 12 else 0:.0f} bits of entropy; at least "
            f"{SECRET_KEY_MIN_BITS} (32 random bytes) are needed: leave it empty (one is generated) or use "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return None


class DimseDestination(BaseModel):
    """A DICOM peer that receives results by C-STORE."""

    type: Literal["dimse"] = "dimse"
    name: str | None = None
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        if not _AE_RE.match(v) or "\\" in v or not v.strip():
            raise ValueError("an AE title is 1-16 printable characters, no backslash")
        return v

    @property
    def key(self) -> str:
        return self.name or f"dimse:{self.ae_title}@{self.host}:{self.port}"


class _HttpDestination(BaseModel):
    """A destination reached over HTTP(S): its base url, basic or bearer credentials, TLS verification."""

    _url_name: ClassVar[str] = "a url"  # in the error of a url that is not http(s)

    type: str
    name: str | None = None
    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    verify_tls: bool = True

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://", v):
            raise ValueError(f"{cls._url_name} starts with http:// or https://")
        return v.rstrip("/")


class StowDestination(_HttpDestination):
    """A DICOMweb server that receives results by STOW-RS."""

    _url_name: ClassVar[str] = "a STOW-RS url"

    type: Literal["stow"]

    @property
    def key(self) -> str:
        return self.name or f"stow:{self.url}"


_HL7_HD_RE = re.compile(r"^[^|^~\\&\r\n]{1,180}$")


class Hl7Destination(BaseModel):
    """An HL7 v2 receiver (RIS, EHR interface engine) that gets one ORU^R01 per finished study over MLLP."""

    type: Literal["hl7"]
    name: str | None = None
    host: str
    port: int = Field(ge=1, le=65535)
    sending_application: str = "MSKNODE"
    sending_facility: str = "MSKNODE"
    receiving_application: str = "RIS"
    receiving_facility: str = "HOSPITAL"
    timeout: float = Field(default=30.0, gt=0, le=600)  # connect + send + wait for the ACK

    @field_validator("sending_application", "sending_facility", "receiving_application", "receiving_facility")
    @classmethod
    def _hd(cls, v: str) -> str:
        if not _HL7_HD_RE.match(v):
            raise ValueError("1-180 characters without HL7 delimiters (| ^ ~ \\ &) or line breaks")
        return v

    @property
    def key(self) -> str:
        return self.name or f"hl7:{self.host}:{self.port}"


class FhirDestination(_HttpDestination):
    """A FHIR R4 server that gets one transaction Bundle (DiagnosticReport + Observations) per finished study."""

    _url_name: ClassVar[str] = "a FHIR base url"

    type: Literal["fhir"]
    timeout: float = Field(default=30.0, gt=0, le=600)
    # the system (URI) of the hospital's patient IDs, e.g. "urn:oid:1.2.3.4"; unset: the ID alone
    patient_identifier_system: str | None = None

    @property
    def key(self) -> str:
        return self.name or f"fhir:{self.url}"


def _destination_type(v: Any) -> str:
    return str(v.get("type", "dimse") if isinstance(v, dict) else getattr(v, "type", "dimse"))


# a destination without "type" is a DIMSE peer (as before the other types existed)
Destination = Annotated[
    Annotated[DimseDestination, Tag("dimse")]
    | Annotated[StowDestination, Tag("stow")]
    | Annotated[Hl7Destination, Tag("hl7")]
    | Annotated[FhirDestination, Tag("fhir")],
    Discriminator(_destination_type),
]
# destination types that get one message per finished study (built from its SR's job), not every result object
REPORT_DESTINATION_TYPES = frozenset({"hl7", "fhir"})


class _TomlSource(PydanticBaseSettingsSource):
    """Reads the optional TOML settings file (keys without the MSKNODE_ prefix)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None):
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            try:
                raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise SettingsError(f"config file {path}: not found") from None
            except tomllib.TOMLDecodeError as e:
                raise SettingsError(f"config file {path}: invalid TOML: {e}") from None
            section = raw.get("msknode", raw)
            self._data = {k.lower(): v for k, v in section.items()}

    def get_field_value(self, field, field_name):  # pragma: no cover - required by ABC
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    """Every setting of the node. See the README's configuration reference."""

    model_config = SettingsConfigDict(env_prefix="MSKNODE_", extra="ignore", validate_default=True)

    # storage
    data_dir: Path = Path("data")
    database_url: str = _DERIVED
    broker_url: str = _DERIVED
    min_free_gb: float = Field(default=1.0, ge=0)
    retention_days: float = Field(default=30.0, ge=0)
    # refused objects (quarantine rows and files) and association rows are deleted this long after they were made
    quarantine_retention_days: float = Field(default=30.0, ge=0)
    association_retention_days: float = Field(default=30.0, ge=0)

    # DICOM listener
    ae_title: str = "MSKNODE"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=1, le=65535)
    allowed_ae_titles: Annotated[list[str], NoDecode] = Field(default_factory=list)
    listener_processes: int = Field(default=2, ge=1, le=32)
    max_associations: int = Field(default=16, ge=1)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    # pynetdicom with the event-driven loops of node.receive.transport; false: stock pynetdicom
    fast_transport: bool = True
    # UPS (node.ups): AE title -> "host:port" of each peer that may subscribe to workitem events
    ups_event_receivers: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # the largest data set one C-STORE may carry (inflated size for deflated transfer syntaxes)
    max_object_mb: int = Field(default=512, ge=1, le=65536)
    # hostile peers: a hard deadline for the A-ASSOCIATE-RQ, connections of one address before it,
    # the PDU length we advertise and enforce, the called AE title, DICOM TLS
    association_request_timeout: float = Field(default=5.0, gt=0, le=120)
    negotiating_per_address: int = Field(default=8, ge=1)
    max_pdu_length: int = Field(default=4 * 1024 * 1024, ge=4096, le=128 * 1024 * 1024)
    require_called_ae_title: bool = True
    listener_tls_cert_file: Path | None = None
    listener_tls_key_file: Path | None = None
    listener_tls_ca_file: Path | None = None

    # completeness and routing
    quiet_seconds: float = Field(default=2.0, ge=0)
    study_quiet_seconds: float = Field(default=1.0, ge=0)
    # pipeline -> the roles its study protocol sends; once all arrived complete the study is settled at once
    study_protocols: Annotated[dict[str, list[str]], NoDecode] = Field(default_factory=dict)
    routing_rules: Path = DEFAULT_ROUTING_RULES
    # the qc.anatomy classifier names a series' anatomy when no header, text or other series does
    routing_pixel_anatomy: bool = True

    # results
    uid_root: str = DEFAULT_UID_ROOT
    destinations: list[Destination] = Field(default_factory=list)
    institution_name: str = "msknode"

    # workers
    torch_threads: int = Field(default=2, ge=1)
    superres_bf16: str = "auto"  # the super-resolution network in bfloat16: on, off, auto (where the CPU has it)
    worker_concurrency: int = Field(default=1, ge=1)
    worker_queues: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["ingest", "cpu", "gpu"])
    inference_queue: Literal["cpu", "gpu"] = "cpu"  # the queue new pipeline jobs are sent to
    job_lease_seconds: float = Field(default=60.0, gt=0)
    job_max_attempts: int = Field(default=3, ge=1)
    # the largest series a job loads (rows x columns x frames); a larger one is refused (series_too_large)
    max_series_voxels: int = Field(default=24 * 1024 * 1024, ge=1024)
    job_retry_backoff_seconds: float = Field(default=30.0, ge=0)
    job_soft_time_limit: float = Field(default=600.0, gt=0)
    job_time_limit: float = Field(default=900.0, gt=0)
    sweep_interval_seconds: float = Field(default=0.5, gt=0)
    # associations (STOW sessions) per destination for the derived objects of a batch (the findings go first, on one)
    dispatch_associations: int = Field(default=2, ge=1, le=8)
    weights_dir: Path | None = None
    # models whose shipped version starts active at this site (node.jobs.deployments); "all" for every model
    activate_models: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # web
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8080, ge=1, le=65535)
    secret_key: str | None = None
    session_minutes: int = Field(default=480, ge=1)
    site_timezone: str = "UTC"
    triage_policy: Path = DEFAULT_TRIAGE_POLICY
    # always mark the session cookie Secure (else only when the request came over https)
    cookie_secure: bool = False
    # proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses or networks; "*" any)
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    # failed logins (any user name) from one client address within the window before it gets 429
    login_ip_max_failures: int = Field(default=20, ge=1)
    login_ip_window_seconds: float = Field(default=300.0, gt=0)
    # the detailed health check runs in the background at most this often (never per request)
    health_interval_seconds: float = Field(default=5.0, ge=1)
    # model monitoring (worklists.monitoring): the current window and the reference window before it
    monitor_window_days: int = Field(default=7, ge=1, le=365)
    monitor_reference_days: int = Field(default=56, ge=7, le=3650)
    # /metrics serves the last monitoring report and refreshes it in the background once older than this
    monitor_refresh_seconds: float = Field(default=60.0, ge=0, le=86400)
    # send each reader's answers to the AI findings of a read study to the DICOM destinations (an SR)
    feedback_sr: bool = False

    # logging
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"  # json: one object per line (time, level, logger, message, UIDs)
    # highdicom, pynetdicom, celery, kombu, httpx, alembic, monai, uvicorn ...: WARNING unless raised for debugging
    log_library_level: str = "WARNING"
    # msknode serve's log file (rotated); empty: <data_dir>/logs/msknode.log
    log_file: Path | None = None
    log_file_max_mb: float = Field(default=20.0, gt=0)
    log_file_backups: int = Field(default=5, ge=0)

    @field_validator("allowed_ae_titles", "worker_queues", "trusted_proxies", "activate_models", mode="before")
    @classmethod
    def _comma_list(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, v: list[str]) -> list[str]:
        import ipaddress

        for item in v:
            if item != "*":
                try:
                    ipaddress.ip_network(item, strict=False)
                except ValueError:
                    raise ValueError(f"{item!r} is not an IP address or network (or *)") from None
        return v

    @field_validator("ups_event_receivers", mode="before")
    @classmethod
    def _ups_receivers(cls, v: Any) -> Any:
        """JSON (``{"RIS": "ris.example.org:104"}``) or ``RIS=ris.example.org:104, VIEWER=10.0.0.5:11112``."""
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("{"):
                v = json.loads(v)
            else:
                pairs = [p.split("=", 1) for p in re.split(r"[,;]", v) if p.strip()]
                if any(len(p) != 2 for p in pairs):
                    raise ValueError("expected AE=host:port, AE2=host:port or a JSON object")
                v = {k.strip(): a.strip() for k, a in pairs}
        if not isinstance(v, dict):
            raise ValueError("expected an object of AE title -> host:port")
        for ae, address in v.items():
            if not _AE_RE.match(str(ae)) or "\\" in str(ae) or not str(ae).strip():
                raise ValueError(f"{ae!r}: an AE title is 1-16 printable characters, no backslash")
            host, _, port = str(address).rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{ae}: {address!r} is not host:port")
        return v

    @field_validator("study_protocols", mode="before")
    @classmethod
    def _protocols_text(cls, v: Any) -> Any:
        """JSON (``{"knee": ["sag_fluid", "cor_fluid"]}``) or ``knee=sag_fluid,cor_fluid; shoulder=cor_fluid``."""
        if not isinstance(v, str):
            return v
        v = v.strip()
        if v.startswith("{"):
            try:
                return json.loads(v)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON: {e}") from None
        out: dict[str, list[str]] = {}
        for part in filter(None, (x.strip() for x in v.split(";"))):
            pipeline, sep, roles = part.partition("=")
            if not sep:
                raise ValueError(f"{part!r} is not PIPELINE=ROLE,ROLE (parts are separated by ';')")
            out[pipeline.strip()] = [r.strip() for r in roles.split(",") if r.strip()]
        return out

    @field_validator("study_protocols")
    @classmethod
    def _protocols(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        from node.intake.routing import LOCALIZER_ROLE, PIPELINE_ROLES

        for pipeline, roles in v.items():
            if pipeline not in PIPELINE_ROLES:
                raise ValueError(f"{pipeline!r} is not a pipeline (pipelines: {', '.join(sorted(PIPELINE_ROLES))})")
            if not roles:
                raise ValueError(f"{pipeline}: list at least one role")
            known = [r for r in PIPELINE_ROLES[pipeline] if r != LOCALIZER_ROLE]
            for role in roles:
                if role not in known:
                    raise ValueError(
                        f"{pipeline}: {role!r} is not an input role of {pipeline} (roles: {', '.join(known)})"
                    )
        return {p: sorted(set(roles)) for p, roles in v.items()}

    @field_validator("superres_bf16", mode="before")
    @classmethod
    def _bf16(cls, v: object) -> str:
        text = str(v).strip().lower()
        for canonical, spellings in (("on", ("1", "on", "true", "yes")), ("off", ("0", "off", "false", "no"))):
            if text in spellings:
                return canonical
        if text in ("", "auto"):
            return "auto"
        raise ValueError("expected on, off or auto")

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        if not _AE_RE.match(v) or "\\" in v or not v.strip():
            raise ValueError("an AE title is 1-16 printable characters, no backslash")
        return v

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, v: str) -> str:
        if not v.endswith("."):
            v = v + "."
        if not _UID_ROOT_RE.match(v) or len(v) > 40:
            raise ValueError("a UID root is dotted digits (no leading zeros), at most 40 characters")
        return v

    @field_validator("site_timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}") from None
        return v

    @field_validator("secret_key")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None  # blank: one is generated and kept in the data dir
        problem = secret_key_problem(v)
        if problem:
            raise ValueError(problem)
        return v

    @field_validator("database_url", "broker_url", mode="wrap")
    @classmethod
    def _unset(cls, v: Any, handler: ValidatorFunctionWrapHandler) -> str | None:
        return None if v is None else handler(v)  # unset: `_derived` fills it in

    @field_validator("log_level", "log_library_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("one of DEBUG, INFO, WARNING, ERROR")
        return v

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'msknode.db'}"
        if self.broker_url is None:
            self.broker_url = "filesystem://"
        if self.job_soft_time_limit >= self.job_time_limit:
            raise ValueError("job_soft_time_limit must be below job_time_limit")
        return self

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        path = os.environ.get("MSKNODE_CONFIG") or None
        return (
            init_settings,
            env_settings,
            _TomlSource(settings_cls, Path(path) if path else None),
            file_secret_settings,
        )

    # ---- derived paths -------------------------------------------------------
    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_dir / "quarantine"

    @property
    def results_dir(self) -> Path:
        return self.data_dir / "results"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def is_sqlite(self) -> bool:
        return str(self.database_url).startswith("sqlite")

    def effective_secret_key(self) -> str:
        """The web session key: the configured one, or one generated once and kept in the data dir."""
        if self.secret_key:
            return self.secret_key
        path = self.data_dir / "secret_key"
        if not path.exists():
            import secrets

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_urlsafe(48))
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        return path.read_text().strip()

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.store_dir, self.quarantine_dir, self.results_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # patient data: the node's user alone (also a data dir made before)


def load_settings(config: str | Path | None = None, **overrides: Any) -> Settings:
    """Builds and validates the settings; raises `SettingsError` with one clear message."""
    if config is not None:
        os.environ["MSKNODE_CONFIG"] = str(config)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "settings"
        name = "MSKNODE_" + str(err["loc"][0]).upper() if err["loc"] else "settings"
        msg = err["msg"].removeprefix("Value error, ")
        raise SettingsError(f"invalid setting {name} ({loc}): {msg}") from None
    except _SourceError as e:
        # e.g. MSKNODE_DESTINATIONS that is not valid JSON
        field = str(e).split('"')[1] if '"' in str(e) else "settings"
        raise SettingsError(f"invalid setting MSKNODE_{field.upper()}: not valid JSON") from None
