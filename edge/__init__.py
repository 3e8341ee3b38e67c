"""The X-ray room edge appliance: DICOM in, TB and nodule findings out to the PACS."""

__version__ = "0.1.0"
