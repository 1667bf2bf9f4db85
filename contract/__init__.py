"""The record contract every package shares (``contract.records``); it imports none of them."""
