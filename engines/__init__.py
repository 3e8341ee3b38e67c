"""Model store and inference runtimes. Works on numpy arrays; knows nothing about DICOM networking."""
from pathlib import Path

DEFAULT_MODELS_DIR = Path(__file__).parent / "models"
