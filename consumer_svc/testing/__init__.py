"""consumer_svc.testing: test handlers against throwaway RabbitMQ nodes.

The pytest plugin of this package (``rabbitmq_node``, ``rabbitmq_url``, ``rabbitmq_factory``)
starts throwaway RabbitMQ nodes; `consumer_svc.testing.rabbitmq` is the harness behind it.
"""
