"""What every floor above shares (ft.common): errors, logs, config fields, dtypes, runtime, environment faults,
model arguments, tables, the launcher's environment; and the shard contract between the stages, `shards/`."""

__version__ = "0.1.0"
