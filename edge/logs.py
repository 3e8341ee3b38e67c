"""Logging set-up shared by the service and its helper processes: no patient data in logs."""
from __future__ import annotations

import logging
import warnings


def quiet_libraries() -> None:
    """Keep the DICOM libraries' chatter out of the log.

    pynetdicom's INFO/DEBUG lines echo request details; pydicom's warnings quote element
    values (names, dates and IDs of the patient) and repeat per element. The appliance
    reports what matters itself: damaged attributes by keyword only, refused requests by
    status. pydicom resets its logger's level when it is first imported, so it is imported
    here first.
    """
    import pydicom  # noqa: F401 - see above

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    warnings.filterwarnings("ignore", module=r"highdicom(\.|$)")
