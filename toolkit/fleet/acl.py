"""The broker ACL of a fleet (Mosquitto ``acl_file`` syntax), written from the device inventory.

Each device logs in with username = device id (a password login, or the common name of its certificate with
``use_identity_as_username``), which is also its client id (``use_username_as_clientid``). It may read its
own and its group's desired state and capture requests, its fleet's keyring and bundles, and write its own
reported state, presence, telemetry, captured predictions and field labels — nothing of another fleet or
group. Mosquitto's ``%u``/``%c`` patterns
can pin a topic level to the login but cannot know which fleet or group a device belongs to, so the
host writes one ``user`` block per device. The host tools' user may read and write the fleet's topics.
"""

from __future__ import annotations

import re
from pathlib import Path

from agent.fleet.protocol import bundle_topic, device_topic, group_topic, keyring_topic
from toolkit.errors import ToolkitError

HOST_USER = "edgeship-host"
_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # one topic level: no + # / or spaces


def device_block(fleet: str, device: str, group: str = "") -> list[str]:
    lines = [f"user {device}", f"topic read {device_topic(fleet, device, 'desired')}"]
    lines += [f"topic write {device_topic(fleet, device, kind)}"
              for kind in ("reported", "presence", "telemetry", "capture", "label")]
    lines.append(f"topic read {device_topic(fleet, device, 'capture_request')}")
    if group:
        lines += [f"topic read {group_topic(fleet, group)}", f"topic read {group_topic(fleet, group, 'capture_request')}"]
    lines += [f"topic read {keyring_topic(fleet)}", f"topic read {bundle_topic(fleet, '#')}"]
    return lines


def check_level(what: str, name: str) -> None:
    if not _LEVEL.match(name):
        raise ToolkitError(f"{what} {name!r}: use letters, digits, '.', '_' or '-' (it becomes a topic level "
                           f"and a broker username)")


def render(fleet: str, devices: dict[str, str], host_user: str | list[str] = HOST_USER) -> str:
    """The ACL text for ``devices`` ({device id: group or ""}) of ``fleet``; ``host_user``: the host tools'
    username(s)."""
    hosts = [host_user] if isinstance(host_user, str) else list(host_user)
    for what, name in [("fleet", fleet), *(("host user", h) for h in hosts), *(("device", d) for d in devices),
                       *(("group", g) for g in devices.values() if g)]:
        check_level(what, name)
    if set(hosts) & set(devices):
        raise ToolkitError(f"device {sorted(set(hosts) & set(devices))[0]!r} has a host tools' username")
    out = [f"# edgeship ACL for fleet {fleet!r}: written by `edgeship fleet acl` (docs/protocol.md, Broker);",
           "# reload the broker after changing it (systemctl reload mosquitto).", ""]
    for h in hosts:
        out += [f"user {h}", f"topic readwrite edgeship/v1/{fleet}/#"]
    for device, group in sorted(devices.items()):
        out += ["", *device_block(fleet, device, group)]
    return "\n".join(out) + "\n"


def read_inventory(path: Path) -> dict[str, str]:
    """One device per line: ``DEVICE [GROUP]``; blank lines and ``#`` comments are skipped."""
    devices: dict[str, str] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolkitError(f"{path}: cannot read the device inventory ({exc})") from exc
    for n, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2 or fields[0] in devices:
            raise ToolkitError(f"{path}:{n}: expected 'DEVICE [GROUP]' once per device, got {line.strip()!r}")
        devices[fields[0]] = fields[1] if len(fields) == 2 else ""
    return devices
