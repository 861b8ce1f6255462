"""Transports: the broker-specific halves of producers and consumers.

`messaging` speaks to brokers only through the protocols in
`duct_messaging.transports.base`; each module here implements them for one
broker and is an optional extra.
"""
