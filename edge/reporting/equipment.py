"""The appliance as the creator of the result objects: General Equipment, the SR's
Device Observer and the IHE AIR contributing-equipment item.

Each box must be told apart in the PACS: ``equipment_from_identity`` gives it the
configured serial number, else a stable one derived from ``/etc/machine-id`` (hashed: the
raw id is a local secret that must not leave the box), and a station name (the configured
one, else the host name).
"""
from __future__ import annotations

import copy
import datetime
import hashlib
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import DT

import edge

from .uids import device_uid

if TYPE_CHECKING:
    from edge.config import IdentityConfig

logger = logging.getLogger(__name__)

__all__ = ["AIR_PROCESSING_ALGORITHM", "Equipment", "air_equipment", "device_observer",
           "equipment_from_identity"]

# IHE AI Results (AIR) profile: purpose of reference of the AI's contributing equipment.
AIR_PROCESSING_ALGORITHM = CodedConcept("Newcode1", "99IHE", "Processing Algorithm")

MACHINE_ID_PATH = Path("/etc/machine-id")
_LO_MAX = 64
_SH_MAX = 16
_SERIAL_SALT = b"xray-edge device serial\x00"
_BAD_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")


@dataclass(frozen=True)
class Equipment:
    """The appliance as the creator of the result objects (General Equipment module)."""

    manufacturer: str = "Open X-ray Edge"
    model_name: str = "xray-edge"
    software_version: str = edge.__version__
    device_serial_number: str = "0"
    institution_name: str | None = None
    station_name: str | None = None

    def __post_init__(self) -> None:
        for name, limit, vr in (("manufacturer", _LO_MAX, "LO"), ("model_name", _LO_MAX, "LO"),
                                ("software_version", _LO_MAX, "LO"),
                                ("device_serial_number", _LO_MAX, "LO"),
                                ("institution_name", _LO_MAX, "LO"),
                                ("station_name", _SH_MAX, "SH")):
            value = getattr(self, name)
            if value is None and name in ("institution_name", "station_name"):
                continue
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Equipment.{name} must be a non-empty string, got {value!r}")
            if len(value.encode("utf-8")) > limit or _BAD_CHARACTERS.search(value):
                raise ValueError(
                    f"Equipment.{name} must be at most {limit} bytes without backslashes or "
                    f"control characters (DICOM {vr}), got {value!r}"
                )

    def texts(self) -> tuple[str, ...]:
        """Every text of the equipment that the results hold (for the character set)."""
        return tuple(v for v in (self.manufacturer, self.model_name, self.software_version,
                                 self.device_serial_number, self.institution_name,
                                 self.station_name) if v)


def equipment_from_identity(identity: IdentityConfig | None = None, *,
                            machine_id_path: str | Path = MACHINE_ID_PATH,
                            hostname: str | None = None) -> Equipment:
    """This box's ``Equipment`` from ``config.identity`` (``None``: all derived).

    Serial number: the configured one, else ``"M-"`` and 12 hex digits of a salted
    SHA-256 of the machine id (``"H-"`` and the host name's hash where there is no
    machine id), stable across restarts and reinstalls of the software. Station name:
    the configured one, else the host name's first label cut to 16 characters.
    """
    serial = getattr(identity, "serial_number", None) or _derived_serial(
        Path(machine_id_path), hostname)
    station = getattr(identity, "station_name", None) or _station_from_hostname(hostname)
    institution = getattr(identity, "institution_name", None) or None
    return Equipment(device_serial_number=serial, station_name=station,
                     institution_name=institution)


def _derived_serial(machine_id_path: Path, hostname: str | None) -> str:
    try:
        machine_id = machine_id_path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        machine_id = ""
    if machine_id:
        return "M-" + hashlib.sha256(_SERIAL_SALT + machine_id.encode()).hexdigest()[:12].upper()
    name = (hostname if hostname is not None else socket.gethostname()).strip()
    if not name:
        logger.warning("no machine id and no host name: the device serial number is '0'; "
                       "set identity.serial_number in the config to tell boxes apart")
        return "0"
    logger.info("no machine id at %s: device serial number derived from the host name",
                machine_id_path)
    return "H-" + hashlib.sha256(_SERIAL_SALT + name.encode()).hexdigest()[:12].upper()


def _station_from_hostname(hostname: str | None) -> str | None:
    name = hostname if hostname is not None else socket.gethostname()
    label = name.strip().split(".")[0] or name.strip()
    label = _BAD_CHARACTERS.sub("", label.encode("ascii", "ignore").decode())[:_SH_MAX].strip()
    return label or None


def device_observer(equipment: Equipment) -> hd.sr.ObserverContext:
    """The SR's Device Observer: UID derived from the serial, station name, serial."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(equipment.manufacturer, equipment.model_name,
                           equipment.device_serial_number),
            name=equipment.station_name or equipment.model_name,
            manufacturer_name=equipment.manufacturer,
            model_name=equipment.model_name,
            serial_number=equipment.device_serial_number,
        ),
    )


def air_equipment(equipment: Equipment, when: datetime.datetime) -> Dataset:
    """IHE AIR Contributing Equipment item naming the AI software that made the results.

    Built by hand: ``highdicom.ContributingEquipment`` accepts only DCM purposes of
    reference, and AIR's is ``(Newcode1, 99IHE)``.
    """
    item = Dataset()
    item.Manufacturer = equipment.manufacturer
    item.ManufacturerModelName = equipment.model_name
    item.SoftwareVersions = equipment.software_version
    item.DeviceSerialNumber = equipment.device_serial_number
    if equipment.institution_name:
        item.InstitutionName = equipment.institution_name
    if equipment.station_name:
        item.StationName = equipment.station_name
    item.PurposeOfReferenceCodeSequence = [copy.deepcopy(AIR_PROCESSING_ALGORITHM)]
    item.ContributionDateTime = DT(when)
    item.ContributionDescription = "AI analysis of the referenced image"
    return item
