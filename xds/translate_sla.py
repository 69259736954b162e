"""The SLA values a control plane sets on a listener's planes through its metadata `planemesh.sla` (split from
xds/translate.py): numbers, booleans, the cpus list, and the plane's mTLS mode, certificate, roots and trust
domain (model/planes.py SLA; the same checks as the static configuration's). Every error names the field."""

from __future__ import annotations

import dataclasses

from planemesh.model.config import ConfigError
from planemesh.model.planes import SLA
from planemesh.model.tls_config import plane_mtls_error
from planemesh.model.validation import check_cpus_field

SLA_FIELDS = {f.name: f for f in dataclasses.fields(SLA) if f.name != "retry_on"}
MTLS_FIELDS = ("mtls", "mtls_cert", "mtls_trust", "mtls_trust_domain")  # strings, checked by model/tls_config.py


def sla_values(meta_sla: object, path: str) -> list[tuple[str, object, str]]:
    """Listener metadata planemesh.sla -> [(field, checked value, its path)]."""
    if not isinstance(meta_sla, dict):
        raise ConfigError(f"{path}.metadata.planemesh.sla", "expected a struct")
    out = []
    for key, value in meta_sla.items():
        where = f"{path}.metadata.planemesh.sla.{key}"
        out.append((key, _value(key, value, where), where))
    return out


def _value(key: str, value: object, where: str) -> object:
    fld = SLA_FIELDS.get(key)
    if fld is None:
        raise ConfigError(where, f"unknown SLA field (known: {', '.join(SLA_FIELDS)})")
    if key in MTLS_FIELDS:
        if not isinstance(value, str):
            raise ConfigError(where, "expected a string")
        if (why := plane_mtls_error(dataclasses.replace(SLA(), **{key: value}))) is not None:
            raise ConfigError(where, why[1])
        return value
    if isinstance(fld.default, bool):
        if not isinstance(value, bool):
            raise ConfigError(where, "expected true or false")
        return value
    if key == "cpus":  # a cpu list ("0-1,3") of the node's online CPUs
        if not isinstance(value, str):
            raise ConfigError(where, "expected a string such as 0-1,3")
        check_cpus_field(value, where)
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ConfigError(where, "expected a non-negative number")
    return int(value) if fld.type in ("int", "int | None") else value


def mtls_set_by(sla: dict[str, object]) -> str:
    """The mTLS field a listener set on a plane, to blame when the plane's Secrets are missing (mtls first)."""
    return next((key for key in MTLS_FIELDS if key in sla), "mtls_cert")
