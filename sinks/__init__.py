"""Consumers of result records: the Parquet lake and alerting."""
