"""Model store and inference runtimes. Works on numpy arrays; knows nothing about DICOM networking."""
