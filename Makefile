# The same commands for a person and for CI (.ci/run): `make test` is the one test command.
#   make bootstrap   .venv with the package and its [test,dev] extras, RabbitMQ if missing,
#                    RabbitMQ 4.0 in a Debian 13 root under .tmp (scripts/rabbitmq4-root.sh)
#   make run         twistd consumer with tap.conf, against a local broker (ARGS="--queue x")
#   make test        lint, type check (the tests too), then pytest (PYTEST_ARGS="tests/unit -x")
#   make lint        ruff check and ruff format --check
#   make bench       the side-by-side benchmark (BENCH_ARGS="--repeat 5")
#   make clean       remove build output, caches and .tmp (keeps .venv; distclean drops it)
SHELL := bash
BIN := .venv/bin
ARGS ?=
PYTEST_ARGS ?=

.PHONY: bootstrap venv run test lint typecheck format bench clean distclean

bootstrap venv:
	scripts/bootstrap.sh

run:
	scripts/run-local.sh $(ARGS)

lint: bootstrap
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The tests and the benchmark too, with the same settings (pyproject.toml [tool.mypy]).
typecheck: bootstrap
	$(BIN)/mypy consumer_svc tests benchmarks

format: bootstrap
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Run as .venv/bin/pytest, not python -m pytest: the repository root stays off sys.path, so
# the tests import the installed package, as a user would.
test: lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

# Side by side with pika, aio-pika and kombu, against a throwaway broker (BENCHMARKS.md).
# BENCH_ARGS="--repeat 5 --long 1000000" for more.
BENCH_ARGS ?=
bench: bootstrap
	$(BIN)/pip install --quiet --disable-pip-version-check '.[bench]'
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# --one-file-system: never delete through a mount (.tmp holds a Debian root).
clean:
	rm -rf --one-file-system build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .tmp
	find . -path ./.venv -prune -o \( -name __pycache__ -o -name dropin.cache \) -print0 \
		| xargs -0 rm -rf

distclean: clean
	rm -rf .venv
