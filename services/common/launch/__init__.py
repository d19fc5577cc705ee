"""Starting real processes: nats-server, tritonserver and the six services.

Used by ``make run`` (``python -m services.common.launch``), the test
fixtures and the benchmark, so all three start the mesh the same way.
"""
