"""What a run leaves behind, typed and torch-free: ``RunRecord`` (results.json), its loader
with schema migration, and the metric protocols' registry (definitions, report columns,
``IGNORE_INDEX``)."""

from segrefine.record.protocols import (BASE_PROTOCOLS, COST, DEFINITIONS, IGNORE_INDEX, PROTOCOL_NOTES, PROTOCOLS,
                                        VOLUME, VOLUME_COLUMNS, Column)
from segrefine.record.run_record import (FILENAME, MIGRATIONS, PREDICTIONS_FILE, SCHEMA, STATUSES, RunRecord, load,
                                         migrate, read_document)

__all__ = ["BASE_PROTOCOLS", "COST", "DEFINITIONS", "IGNORE_INDEX", "PROTOCOL_NOTES", "PROTOCOLS", "VOLUME",
           "VOLUME_COLUMNS", "Column", "FILENAME", "MIGRATIONS", "PREDICTIONS_FILE", "SCHEMA", "STATUSES", "RunRecord",
           "load", "migrate", "read_document"]
