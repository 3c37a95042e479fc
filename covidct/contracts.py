"""The names that writers, readers, configs and tests share, each defined once.

Pure constants (no imports beyond the standard library), so any module may import it.
"""

from __future__ import annotations

from pathlib import Path

CONF_DIR: str = str(Path(__file__).resolve().parents[1] / "conf")
"""The Hydra config folder (absolute: ``python -m covidct.<module>`` finds it from any working folder)."""
