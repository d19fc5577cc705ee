"""The shared runtime every Loom service imports.

Bus, envelope, subjects, errors, telemetry, metrics, settings and lifecycle
live here once; a service is a thin package on top.
"""
