"""``loomctl``: the operator's command line for a running Loom mesh.

It speaks HTTP only: the gateway's ``/v1`` API (predict, feedback, readiness, and ``/v1/admin``:
the model registry, traffic policy, rollouts and the audit log) and the
monitor's JSON API (dashboard, traces, alerts, drift, accuracy). Standard library only,
so it runs wherever Python 3.11 does.
"""
