# The project's vocabulary: install, proto, run, test, lint, bench.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
MODELS ?= var/models
DATA   ?= var/sample
ML100K ?= ../shared/datasets/ml-100k
PROTO_SRC := proto/recsvc/v1/recommender.proto proto/recsvc/v1/updates.proto
PROTO_OUT := recsvc/v1/recommender_pb2.py recsvc/v1/updates_pb2.py
CLIENT_OUT := clients/python/recsvc_client/_v1/recommender_pb2.py clients/python/recsvc_client/_v1/updates_pb2.py

.PHONY: install proto client run test lint mutation bench bench-quick sample model reproduce-ml100k clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,plots]'
	touch $@

install: $(VENV)/.installed proto

$(PROTO_OUT) &: $(PROTO_SRC) $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -Iproto --plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy \
		--python_out=. --grpc_python_out=. --mypy_out=. $(PROTO_SRC)

# The client distribution (clients/python), installed editable: its own build step
# generates its copy of the code from the same protos.
$(CLIENT_OUT) &: $(PROTO_SRC) clients/python/setup.py clients/python/pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e clients/python

client: $(CLIENT_OUT)

proto: $(PROTO_OUT) $(CLIENT_OUT)

$(DATA)/interactions.parquet: | install
	$(VENV)/bin/recsvc-train sample-data --out $(DATA)

$(MODELS)/LATEST: | $(DATA)/interactions.parquet
	$(VENV)/bin/recsvc-train fit --interactions $(DATA)/interactions.parquet \
		--items $(DATA)/items.parquet --users $(DATA)/users.parquet --models $(MODELS)

sample: $(DATA)/interactions.parquet
model: $(MODELS)/LATEST

# The embedded live state, and its pseudonym key: made once, kept under var/ (never in git).
STATE   ?= sqlite:///var/state.db
KEYFILE := var/pseudonym.key

$(KEYFILE):
	mkdir -p $(dir $@)
	umask 077 && $(PY) -c "import secrets; print(secrets.token_hex(32))" > $@

run: install model $(KEYFILE)
	RECSVC_PSEUDONYM_KEY=$$(cat $(KEYFILE)) $(VENV)/bin/recsvc serve --models $(MODELS) \
		--state $(STATE) --host localhost --port 50051

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check recsvc training tests bench clients
	$(VENV)/bin/ruff format --check recsvc training tests bench clients
	$(VENV)/bin/mypy recsvc training clients/python/recsvc_client

# Mutation testing of the guarantee code ([tool.mutmut] in pyproject.toml). Slow: run it
# by module, e.g. make mutation MUTANTS='recsvc.model.rules.*'; results are kept in mutants/.
# Each mutant is a fresh pytest session: the sample and its trained bundle are built once
# into mutants/fixture-cache instead (tests/fixture_cache.py). CHILDREN=1 on a busy machine.
MUTANTS  ?=
CHILDREN ?= 2
mutation: install
	RECSVC_TEST_FIXTURE_CACHE=$(CURDIR)/mutants/fixture-cache RECSVC_TEST_MUTATION=1 \
		$(VENV)/bin/mutmut run --max-children $(CHILDREN) $(MUTANTS)
	$(VENV)/bin/mutmut results

bench: install
	$(PY) -m bench.run

bench-quick: install
	$(PY) -m bench.run --quick

reproduce-ml100k: install
	$(PY) -m bench.ml100k --data $(ML100K)

clean:
	rm -rf $(VENV) var mutants recsvc/v1/*_pb2*.py* .pytest_cache .mypy_cache .ruff_cache \
		clients/python/recsvc_client/_v1/*_pb2*.py* clients/python/build
