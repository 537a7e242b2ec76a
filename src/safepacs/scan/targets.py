"""What to scan: ``host``, ``host:port``, ``[v6]:port``, IPv4/IPv6 CIDR networks, files of those; port lists.

Parsing never touches the network: host names are resolved when the scan runs.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from safepacs.scan._model import ScanError

__all__ = [
    "DEFAULT_DICOM_PORTS",
    "DEFAULT_HTTP_PORTS",
    "DEFAULT_PORTS",
    "MAX_ADDRESSES",
    "Target",
    "count_addresses",
    "expand",
    "parse_ports",
    "parse_target",
    "read_targets_file",
]

#: DICOM: 104 and 11112 (PS3.8 well-known and registered), 2761/2762 (DICOM ISCL / DICOM TLS), 4242 (Orthanc).
DEFAULT_DICOM_PORTS = (104, 2761, 2762, 4242, 11112)
#: HTTP(S): 80/443, 8042 (Orthanc), 8080, 8443 (SafePACS and many Java archives).
DEFAULT_HTTP_PORTS = (80, 443, 8042, 8080, 8443)
DEFAULT_PORTS = tuple(sorted(DEFAULT_DICOM_PORTS + DEFAULT_HTTP_PORTS))
#: The most addresses one run expands to unless ``--max-addresses`` says otherwise (a /16).
MAX_ADDRESSES = 65536

_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


@dataclass(frozen=True)
class Target:
    """One thing the user asked to scan: an address, a network or a host name, and maybe one port."""

    text: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    hostname: str | None = None
    port: int | None = None

    def addresses(self) -> Iterator[str]:
        """The addresses of a network or a single address (not host names: those are resolved later)."""
        if self.network is None:
            return iter(())
        net = self.network
        if net.num_addresses == 1:
            return iter((str(net.network_address),))
        return (str(a) for a in net.hosts())


def _port(text: str, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ScanError(f"{where}: {text!r} is not a port number (1-65535)")
    return int(text)


def parse_ports(text: str) -> tuple[int, ...]:
    """``104,11112,8000-8010`` -> sorted unique ports."""
    ports: set[int] = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if "-" in part:
            low_text, _, high_text = part.partition("-")
            low, high = _port(low_text.strip(), "--ports"), _port(high_text.strip(), "--ports")
            if low > high:
                raise ScanError(f"--ports: range {part!r} runs backwards")
            ports.update(range(low, high + 1))
        else:
            ports.add(_port(part, "--ports"))
    if not ports:
        raise ScanError("--ports needs at least one port, e.g. --ports 104,11112,8042")
    return tuple(sorted(ports))


def parse_target(text: str) -> Target:
    """One target as typed: ``10.0.0.5``, ``10.0.0.5:104``, ``10.0.0.0/24``, ``::1``, ``[::1]:104``,
    ``fd00::/120``, ``pacs.example.org``, ``pacs.example.org:4242``."""
    raw = text.strip()
    if not raw:
        raise ScanError("an empty target; give a host, host:port or CIDR network")
    port: int | None = None
    host = raw
    if raw.startswith("["):
        inner, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ScanError(f"{raw!r} is not a target; write IPv6 with a port as [addr]:port")
        host = inner
        if rest:
            port = _port(rest[1:], raw)
    elif raw.count(":") == 1:  # host:port or v4:port (IPv6 has two colons at least)
        host, _, port_text = raw.partition(":")
        port = _port(port_text, raw)
    if "/" in host:
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            raise ScanError(f"{raw!r} is not a valid CIDR network (e.g. 10.0.0.0/24, fd00::/120)") from None
        return Target(raw, network=network, port=port)
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        if _HOSTNAME_RE.match(host) and not host.replace(".", "").isdigit():
            return Target(raw, hostname=host.rstrip(".").lower(), port=port)
        raise ScanError(f"{raw!r} is neither an IP address, a CIDR network nor a host name") from None
    return Target(raw, network=ipaddress.ip_network(address), port=port)


def read_targets_file(path: Path) -> list[Target]:
    """One target per line; blank lines and ``#`` comments are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ScanError(f"cannot read targets file {path} ({exc.strerror or exc})") from exc
    except UnicodeDecodeError:
        raise ScanError(f"targets file {path} is not UTF-8 text") from None
    targets = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            targets.append(parse_target(text))
        except ScanError as exc:
            raise ScanError(f"{path}:{number}: {exc}") from None
    return targets


def count_addresses(targets: Iterable[Target]) -> int:
    total = 0
    for t in targets:
        if t.network is None:
            total += 1
        else:
            n = t.network.num_addresses
            total += n if n <= 2 else n - 2 if t.network.version == 4 else n - 1
    return total


def expand(
    targets: Iterable[Target], ports: tuple[int, ...], *, max_addresses: int = MAX_ADDRESSES
) -> list[tuple[Target, str, int]]:
    """(target, address or host name, port) for every address x port, duplicates removed, in order.

    Refuses to expand to more than ``max_addresses`` addresses (a typo like /8 for /24).
    """
    targets = list(targets)
    total = count_addresses(targets)
    if total > max_addresses:
        raise ScanError(
            f"the targets hold {total} addresses, more than --max-addresses {max_addresses}; "
            "split them or raise the limit"
        )
    seen: set[tuple[str, int]] = set()
    out: list[tuple[Target, str, int]] = []
    for t in targets:
        hosts: Iterable[str] = (t.hostname,) if t.hostname else t.addresses()
        for host in hosts:
            for port in (t.port,) if t.port is not None else ports:
                if (host, port) not in seen:
                    seen.add((host, port))
                    out.append((t, host, port))
    return out
