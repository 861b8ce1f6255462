"""Messaging: routing, codecs, schemas, tracing, producers and consumers."""
