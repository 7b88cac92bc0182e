"""Tests against real throwaway RabbitMQ nodes (3.10, and 4.0 where marked), with the service
in this process or as `twistd` subprocesses, and the dead-letters tool as a command.
"""
