"""matloop core: pure domain code (structures, physics, models, metrics). No Prefect here."""

__version__ = "0.1.0"
