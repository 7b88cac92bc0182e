"""Side-by-side throughput benchmark: consumer_svc against pika, aio-pika and kombu (see BENCHMARKS.md)."""
