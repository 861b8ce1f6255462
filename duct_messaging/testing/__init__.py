"""Helpers for testing applications and this library against real brokers."""
