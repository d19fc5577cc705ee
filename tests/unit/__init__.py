"""Unit tests: pure logic, no processes."""
