"""DICOM networking only: C-STORE/C-ECHO SCP and SCU. Knows nothing about AI."""
