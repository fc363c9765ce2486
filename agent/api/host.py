"""GET /host/info: PCI devices and physical disks of the host, read from sysfs under the host root.

The Go agent asks jaypipes/ghw 0.9 (chroot = /host); this follows what ghw reports:

* PCI: one entry per `sys/bus/pci/devices/<addr>` (sorted by address) whose `modalias` parses; vendor and
  product names from the first of `usr/share/{hwdata,misc}/pci.ids[.gz]`, "unknown" when an ID is not in it.
* Disks: every `sys/block/<name>` but `loop*` (sorted), Vendor from `device/vendor` ("unknown" when absent),
  Size = `size` (512-byte sectors) * 512.
* `PhysicalDisks` is null when there are none (Go appends to a nil slice).

Ours differs where ghw gives up: without any pci.ids ghw fails and the agent answers `"PCIDevices": null`;
ours still lists the devices with their hex IDs as names (e.g. Vendor "8086", Name "1237").
"""

from __future__ import annotations

import asyncio
import gzip
import os
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from agent.appkeys import DEFAULT_HOST_ROOT, HOST_ROOT_KEY
from agent.errors import Code, json_error

UNKNOWN = "unknown"
SECTOR_SIZE = 512
PCI_IDS_PATHS = (
    "usr/share/hwdata/pci.ids",
    "usr/share/misc/pci.ids",
    "usr/share/hwdata/pci.ids.gz",
    "usr/share/misc/pci.ids.gz",
)
"""pcidb's search order under the chroot."""

_PciDb = tuple[dict[str, str], dict[str, str]]
_db_cache: dict[tuple[str, int, int], _PciDb] = {}


async def host_info(request: web.Request) -> web.Response:
    """The Go agent's HostInfo; the sysfs walk and the pci.ids parse run in a thread."""
    root = request.app.get(HOST_ROOT_KEY, DEFAULT_HOST_ROOT)
    try:
        info = await asyncio.to_thread(read_host_info, root)
    except (OSError, ValueError) as exc:
        return json_error(500, "Unable to retrieve host information", Code.HOST_INFO_FAILED,
                          details=str(exc), root=root)
    return web.json_response(info)


def read_host_info(root: str) -> dict[str, Any]:
    """Blocking: `{"PCIDevices": [...], "PhysicalDisks": [...] | None}` for the host mounted at `root`."""
    disks = physical_disks(root)
    return {"PCIDevices": pci_devices(root), "PhysicalDisks": disks or None}


def pci_devices(root: str) -> list[dict[str, str]]:
    """Vendor and product names of every PCI function ghw would list."""
    devices_dir = os.path.join(root, "sys/bus/pci/devices")
    try:
        addresses = sorted(os.listdir(devices_dir))
    except OSError:
        return []  # ghw: a warning and no devices
    db = load_pci_db(root)
    devices = []
    for address in addresses:
        ids = _modalias_ids(os.path.join(devices_dir, address, "modalias"))
        if ids is None:
            continue  # ghw skips a device whose modalias it cannot parse
        vendor_id, product_id = ids
        if db is None:
            devices.append({"Vendor": vendor_id, "Name": product_id})
            continue
        vendors, products = db
        devices.append({
            "Vendor": vendors.get(vendor_id, UNKNOWN),
            "Name": products.get(vendor_id + product_id, UNKNOWN),
        })
    return devices


def _modalias_ids(path: str) -> tuple[str, str] | None:
    """`pci:v000010DEd00001C82sv...` -> ("10de", "1c82"), at ghw's fixed offsets."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            data = f.read()
    except OSError:
        return None
    if len(data) < 54 or not data.startswith("pci:"):
        return None
    return data[9:13].lower(), data[18:22].lower()


def load_pci_db(root: str) -> _PciDb | None:
    """(vendor -> name, vendor + product -> name) from the host's pci.ids, cached per file version."""
    for rel in PCI_IDS_PATHS:
        path = os.path.join(root, rel)
        try:
            st = os.stat(path)
        except OSError:
            continue
        key = (path, st.st_mtime_ns, st.st_size)
        db = _db_cache.get(key)
        if db is None:
            opener = gzip.open if path.endswith(".gz") else open
            try:
                with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                    db = parse_pci_ids(f)
            except (OSError, EOFError):
                continue  # pcidb would fail on it; try the next candidate
            _db_cache.clear()
            _db_cache[key] = db
        return db
    return None


def parse_pci_ids(lines: Iterable[str]) -> _PciDb:
    """The vendor/device part of pci.ids (subsystems and the trailing class list are not needed)."""
    vendors: dict[str, str] = {}
    products: dict[str, str] = {}
    vendor: str | None = None
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line or line.startswith("#"):
            continue
        if line.startswith("C "):
            vendor = None  # the class section: no more vendors follow
            continue
        if not line.startswith("\t"):
            vendor = line[0:4].lower()
            vendors[vendor] = line[6:]
        elif vendor is not None and not line.startswith("\t\t"):
            products[vendor + line[1:5].lower()] = line[7:]
    return vendors, products


def physical_disks(root: str) -> list[dict[str, Any]]:
    """Every block device ghw calls a disk: all of sys/block but loop devices."""
    block_dir = os.path.join(root, "sys/block")
    try:
        names = sorted(os.listdir(block_dir))
    except OSError:
        return []  # ghw: no disks (and no error)
    disks = []
    for name in names:
        if name.startswith("loop"):
            continue
        disks.append({
            "Vendor": _read_text(os.path.join(block_dir, name, "device", "vendor"), UNKNOWN),
            "Size": _sectors(os.path.join(block_dir, name, "size")) * SECTOR_SIZE,
        })
    return disks


def _read_text(path: str, default: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return default


def _sectors(path: str) -> int:
    """ghw: ParseUint of the trimmed `size`, 0 when unreadable or not a number."""
    text = _read_text(path, "")
    return int(text) if text.isascii() and text.isdigit() else 0
