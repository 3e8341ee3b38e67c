"""SOP classes and transfer syntaxes the node speaks."""
from __future__ import annotations

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_FOR_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
GRAYSCALE_SOFTCOPY_PS = "1.2.840.10008.5.1.4.1.1.11.1"
VERIFICATION = "1.2.840.10008.1.1"

#: Storage SOP classes accepted from the X-ray machine.
ACCEPTED_STORAGE = (CR_IMAGE_STORAGE, DX_FOR_PRESENTATION, DX_FOR_PROCESSING, SECONDARY_CAPTURE)

#: Transfer syntaxes accepted for them (all of them decodable by pydicom + pylibjpeg).
ACCEPTED_TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
)

#: Result objects the SCU sends to the PACS (uncompressed is universally accepted).
RESULT_STORAGE = (COMPREHENSIVE_3D_SR, GRAYSCALE_SOFTCOPY_PS, SECONDARY_CAPTURE)

#: Uncompressed transfer syntaxes every storage SCP accepts: the fallback when a PACS does
#: not accept the transfer syntax an object was received in.
NATIVE_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: Storage Commitment Push Model (PS3.4 Annex J) and its well-known SOP Instance.
STORAGE_COMMITMENT = str(StorageCommitmentPushModel)
STORAGE_COMMITMENT_INSTANCE = str(StorageCommitmentPushModelInstance)

