"""One model in one process: specs, backends, context pools and the local retry loop.

Nothing in this package imports Ray; deployments/ builds on it.
"""
