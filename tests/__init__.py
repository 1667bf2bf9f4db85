"""The test suite: unit tests, and integration tests against a real local Kafka and browser."""
