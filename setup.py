"""Packaging for consumer_svc: the library, its twistd plugin, and extras."""

from pathlib import Path

from setuptools import setup

setup(
    name="consumer_svc",
    version="0.1.0",
    description="A long-running RabbitMQ consumer service for Twisted: twistd consumer --queue NAME",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    # "twisted.plugins" has no __init__.py on purpose: the plugin file is
    # installed into Twisted's own twisted/plugins/ package.
    packages=["consumer_svc", "consumer_svc.testing", "twisted.plugins"],
    package_data={"consumer_svc": ["py.typed"], "twisted": ["plugins/consumer_plugin.py"]},
    install_requires=[
        "pika>=1.4.4,<2",
        # [tls] brings pyOpenSSL, service-identity and idna: amqps:// with
        # certificate and hostname verification.
        "twisted[tls]>=24.7",
        # /metrics in Prometheus's text format: the reference client, not our own.
        "prometheus-client>=0.20",
    ],
    extras_require={
        # Tracing (OpenTelemetry's API only): spans for each delivery and publish. The SDK and
        # its exporters are the operator's choice (opentelemetry-sdk, -exporter-otlp, or the
        # opentelemetry-instrument launcher); without them the API's no-op costs nothing.
        "otel": ["opentelemetry-api>=1.27"],
        # opentelemetry-sdk: the tracing tests record spans with its InMemorySpanExporter
        # and check the SDK's own autoconfiguration (OTEL_TRACES_EXPORTER=console).
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "pytest-timeout>=2.3",
            "opentelemetry-api>=1.27",
            "opentelemetry-sdk>=1.27",
        ],
        # mypy-zope: Twisted's interfaces are zope.interface ones, which plain mypy cannot check.
        "dev": ["ruff>=0.6", "mypy>=1.11", "mypy-zope>=1.0"],
        # The benchmark's peers: never runtime dependencies.
        "bench": ["aio-pika>=9", "kombu>=5.3", "psutil>=5", "matplotlib>=3.7"],
    },
    entry_points={
        # pytest loads this in any environment with consumer_svc installed: throwaway
        # RabbitMQ node fixtures for handler authors (consumer_svc.testing.pytest_plugin).
        "pytest11": ["consumer_svc = consumer_svc.testing.pytest_plugin"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Networking",
        "Typing :: Typed",
    ],
)
