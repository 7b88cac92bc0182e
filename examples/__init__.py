"""Example handlers for consumer_svc (see README.md)."""
