# Every target makes and uses .venv itself: on a fresh clone `make demo` and `make test` are enough.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

export PYTHONUNBUFFERED := 1
export BENTOML_DO_NOT_TRACK := True

.PHONY: help setup test demo bench-collect soak-collect bench-train bench-calibration bench-int8 bench-attributes bench-serve loadtest soak lint clean bench-service container-check

# glibc malloc returns freed pages to the OS on every step and then page-faults them back;
# pinning them cut CPU training time 3-4x here (BENCHMARKS.md, trainer section). Only for the
# targets that train inside their own process: `python -m trainer` sets them itself, and a
# crawl or a server should give memory back.
TRAINS_IN_PROCESS := test bench-train bench-calibration bench-attributes bench-serve
$(TRAINS_IN_PROCESS): export MALLOC_MMAP_MAX_ ?= 0
$(TRAINS_IN_PROCESS): export MALLOC_TRIM_THRESHOLD_ ?= 68719476736

help:  ## list the make commands
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/' | expand -t 18

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with every extra (collect, train, serve, loadtest, dev)

test: $(STAMP) chromium  ## run the test suite (real servers on 127.0.0.1, real models, real photos)
	$(PY) -m pytest -q

demo: $(STAMP)  ## the whole pipeline end to end, offline, on the bundled demo catalog
	$(PY) -m demo

# --- review page (collector/review/) ---------------------------------------------------------
.PHONY: chromium bench-review
CHROMIUM ?= /usr/bin/chromium

chromium:  ## Debian's chromium for the review page's browser tests (apt-get when missing)
	@test -x $(CHROMIUM) || { echo "installing chromium (review page tests drive it)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

bench-review: $(STAMP)  ## review page: 20,000-image paging, thumbnails; finding flipped labels
	$(PY) -m benchmarks.bench_review $(BENCH_REVIEW_ARGS)

# --- collector (collector/) -----------------------------------------------------------------
# img2dataset pins its own deps: it lives in .venv-bench, never in .venv.
.venv-bench/bin/img2dataset:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q img2dataset

bench-collect: $(STAMP) .venv-bench/bin/img2dataset  ## collector vs img2dataset, same URLs on 127.0.0.1, images/s
	$(PY) -m benchmarks.bench_collect $(BENCH_COLLECT_ARGS)

COLLECT_SOAK_TIME ?= 600
soak-collect: $(STAMP)  ## crawl the demo shop with every fault on for COLLECT_SOAK_TIME s: memory, every image accounted for
	$(PY) -m benchmarks.soak_collect --duration-s $(COLLECT_SOAK_TIME) $(SOAK_COLLECT_ARGS)

# --- trainer (trainer/) ---------------------------------------------------------------------
bench-train: $(STAMP)  ## default recipe vs linear probe: clothing-small, small subsets over seeds, demo catalogue
	$(PY) -m benchmarks.bench_train $(BENCH_TRAIN_ARGS)

bench-calibration: $(STAMP)  ## the probe's out-of-fold temperature on its refit: held-out ECE as fitted vs carried
	$(PY) -m benchmarks.bench_calibration $(BENCH_CALIBRATION_ARGS)

bench-int8: $(STAMP)  ## int8 with 8-bit vs 7-bit weights (--int8-reduce-range) vs fp32: accuracy, speed (RUN=run folder DATA=photos)
	@test -n "$(RUN)" -a -n "$(DATA)" || { echo "usage: make bench-int8 RUN=RUN_DIR DATA=PHOTO_FOLDER"; exit 2; }
	$(PY) -m benchmarks.bench_int8 $(RUN) --data $(DATA) $(BENCH_INT8_ARGS)

bench-attributes: $(STAMP)  ## attribute heads: shared model vs one model per attribute; serving cost of the heads
	$(PY) -m benchmarks.bench_attributes $(BENCH_ATTRIBUTES_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check collector trainer service loadtests benchmarks tests demo.py

clean:
	rm -rf runs reports demo_out bench_out .pytest_cache

# --- load tests and serving benchmark (loadtests/) ------------------------------------------
HOST       ?= http://127.0.0.1:3000
USERS      ?= 16
SPAWN_RATE ?= 8
RUN_TIME   ?= 30s
BENCH_RUN  ?= runs/bench-serve
SOAK_TIME  ?= 600

loadtest: $(STAMP)  ## Locust headless against a running service (HOST, USERS, RUN_TIME) -> reports/
	mkdir -p reports
	$(BIN)/locust -f loadtests/locustfile.py --headless --host $(HOST) -u $(USERS) \
	  -r $(SPAWN_RATE) -t $(RUN_TIME) --csv reports/loadtest --html reports/loadtest.html

bench-serve: $(STAMP)  ## ceiling vs service (batching on/off, fp32/int8) vs baseline, one run
	$(PY) -m benchmarks.bench_serve --run $(BENCH_RUN) $(BENCH_ARGS)

soak: $(STAMP)  ## steady load for SOAK_TIME s on a fresh service: memory and latency drift
	$(PY) -m benchmarks.bench_serve --run $(BENCH_RUN) --prepare-only
	$(PY) -m benchmarks.soak --model $(BENCH_RUN)/export/model.onnx --duration-s $(SOAK_TIME) $(SOAK_ARGS)

# --- service (service/) ----------------------------------------------------------------------
bench-service: $(STAMP)  ## service topology: API + batched model service vs one service, ratios
	$(PY) -m benchmarks.bench_serve --run $(BENCH_RUN) --prepare-only
	$(PY) -m benchmarks.bench_service --model $(BENCH_RUN)/export/model.onnx $(BENCH_SERVICE_ARGS)
container-check: $(STAMP)  ## service image: bentoml containerize (buildah) + podman run, /readyz + /classify
	$(PY) -m benchmarks.container_check $(CONTAINER_CHECK_ARGS)
