PYTHON ?= python3
PORT ?= 8080

.PHONY: run test insert token demo client test-browser test-proxy test-metrics bench bench-full clean

run:
	$(PYTHON) broker.py --port $(PORT)

# The tests run in .venv/ when it exists: deploy/install-postgres.sh puts psycopg there.
TEST_PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,$(PYTHON))

test:
	$(TEST_PYTHON) -m unittest -v test_broker test_postgres

insert:
	curl -s localhost:$(PORT)/insert -H 'Content-Type: application/json' \
		-d '{"event": "user", "data": {"user": "Ada"}}'
	@echo

SECRET ?= $(BROKER_JWT_SECRET)
PUBLISH ?= *
SUBSCRIBE ?= *

token:
	$(PYTHON) broker.py token --secret '$(SECRET)' --publish '$(PUBLISH)' --subscribe '$(SUBSCRIBE)' --expires 86400

demo client:
	@echo "name demo:  http://127.0.0.1:$(PORT)/index.html"
	@echo "inspector:  http://127.0.0.1:$(PORT)/inspector.html"
	$(PYTHON) broker.py --port $(PORT) --static demo

test-browser:
	sh demo/install-browser.sh
	.venv/bin/python -m unittest -v demo/test_demo.py

test-proxy:
	sh deploy/install-nginx.sh
	$(PYTHON) -m unittest -v deploy/test_nginx.py
	sh demo/install-browser.sh
	.venv/bin/python -m unittest -v deploy/test_http2.py
	sh deploy/install-postgres.sh
	.venv/bin/python -m unittest -v deploy/test_nodes.py

test-metrics:
	[ -x .venv/bin/python ] || $(PYTHON) -m venv .venv
	.venv/bin/python -c "import prometheus_client" 2>/dev/null || .venv/bin/pip install -q prometheus_client
	.venv/bin/python -m unittest -v deploy/test_metrics.py
	BROKER_TEST_WORKERS=2 .venv/bin/python -m unittest -v deploy/test_metrics.py

BENCH_ARGS ?=

bench:
	$(PYTHON) bench_broker.py --quick $(BENCH_ARGS)

bench-full:
	$(PYTHON) bench_broker.py --json tmp/bench-full.json $(BENCH_ARGS)

clean:
	rm -rf tmp __pycache__ demo/__pycache__ deploy/__pycache__
