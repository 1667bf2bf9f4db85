"""Threshold alerting on result records: rules, incidents, silences and delivery through apprise."""
