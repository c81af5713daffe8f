"""Simulated hosts for the multi-host tests: one network namespace each.

Every host gets a veth pair whose other end joins a bridge of the network's
own, and one address on a /24 that exists only there. The bridge has no
address in this (the machine's) namespace, and a blackhole route for the
subnet keeps anything here from sending such an address off the machine:
the hosts reach each other, and nothing else reaches them. Links are cut
and restored from this side (``cut`` / ``restore``); a host's own route to
one peer can be dropped inside its namespace (``block`` / ``unblock``).

``Network.close`` kills what still runs in the namespaces and removes every
namespace, link and route it made, whether the test passed or not. Root only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _used_subnets() -> set[str]:
    """The 10.x.y.0/24 prefixes this machine already routes or addresses."""
    text = _ip("-4", "route", "show", "table", "all").stdout + _ip("-4", "addr").stdout
    used = set()
    for word in text.split():
        if word.startswith("10."):
            parts = word.split("/")[0].split(".")
            if len(parts) == 4:
                used.add(".".join(parts[:3]))
    return used


@dataclass
class Host:
    """One simulated host: its namespace name, address and the veth end
    on the bridge (in this namespace) that ``Network.cut`` takes down.
    """

    name: str
    netns: str
    address: str
    link: str


@dataclass
class Network:
    """A bridge and its hosts (see the module doc). Use as a context manager."""

    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    hosts: dict[str, Host] = field(default_factory=dict)
    subnet: str = ""
    _bridge: str = ""

    def __post_init__(self) -> None:
        used = _used_subnets()
        for _ in range(1000):
            prefix = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(256)}"
            if prefix not in used:
                break
        else:
            raise RuntimeError("no free 10.x.y.0/24 for the simulated hosts")
        self.subnet = f"{prefix}.0/24"
        self._bridge = f"cfsbr{self.tag}"

    def __enter__(self) -> Network:
        try:
            _ip("route", "add", "blackhole", self.subnet)
            _ip("link", "add", self._bridge, "type", "bridge")
            _ip("link", "set", self._bridge, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, name: str) -> Host:
        """A new host named ``name`` on the bridge, with the next address."""
        index = len(self.hosts) + 1
        net = ipaddress.ip_network(self.subnet)
        host = Host(name, f"cfs{self.tag}{name}", str(net[index]), f"cfs{self.tag}v{index}")
        self.hosts[name] = host
        _ip("netns", "add", host.netns)
        _ip("link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _ip("link", "set", host.link, "master", self._bridge, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/{net.prefixlen}", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        return host

    def cut(self, host: Host) -> None:
        """Take the host's link down: nothing reaches it, it reaches nothing."""
        _ip("link", "set", host.link, "down")

    def restore(self, host: Host) -> None:
        """Bring the host's link back up."""
        _ip("link", "set", host.link, "up")

    def block(self, host: Host, peer: Host) -> None:
        """Drop what ``host`` sends to ``peer`` (a blackhole route inside it)."""
        _ip("-n", host.netns, "route", "add", "blackhole", f"{peer.address}/32")

    def unblock(self, host: Host, peer: Host) -> None:
        """Undo ``block``."""
        _ip("-n", host.netns, "route", "del", "blackhole", f"{peer.address}/32")

    def close(self) -> None:
        """Kill what runs in the namespaces; remove them, the bridge and the route."""
        for host in self.hosts.values():
            for pid in _pids_in(host.netns):
                log.warning("killing pid %d, left running in %s", pid, host.netns)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", host.netns, check=False)
            _ip("link", "del", host.link, check=False)
        self.hosts.clear()
        _ip("link", "del", self._bridge, check=False)
        _ip("route", "del", "blackhole", self.subnet, check=False)


def _pids_in(netns: str) -> list[int]:
    """Processes whose network namespace is ``netns``."""
    try:
        target = os.stat(f"/run/netns/{netns}")
    except FileNotFoundError:
        return []
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            st = os.stat(Path("/proc", entry, "ns", "net"))
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            pids.append(int(entry))
    return pids


@dataclass(frozen=True)
class Certificates:
    """A test CA's certificate, and per host name its certificate and key (PEM files)."""

    ca: Path
    certs: dict[str, tuple[Path, Path]]


def make_certificates(directory: Path, addresses: dict[str, str]) -> Certificates:
    """A CA made here, and for each ``name -> IP address`` a certificate it
    signed for that address (an IP subject alternative name), valid a day.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def build(subject: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chunkfs test CA")])
    ca_cert = (
        build("chunkfs test CA", ca_key)
        .issuer_name(ca_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs = {}
    for name, address in addresses.items():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            build(name, key)
            .issuer_name(ca_name)
            .add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(pem_key(key))
        key_path.chmod(0o600)
        certs[name] = (cert_path, key_path)
    return Certificates(ca_path, certs)
