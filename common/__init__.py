"""Helpers the runtime, the sinks and the application share: Kafka clients and security,
retries, durations, atomic files and throttled logs. Imports none of the other packages."""
