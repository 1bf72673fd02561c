# Two entry points: `make demo` (main job) and `make test` (test suite). Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The oldest transformers release pyproject.toml allows; `make test` checks it too.
OLDEST_TRANSFORMERS ?= 5.18.0
OLDEST_DIR := .cache/transformers-$(OLDEST_TRANSFORMERS)
# pytest-xdist workers: whole test files each (tests/conftest.py), torch on one thread each.
TEST_WORKERS ?= 2

.PHONY: demo test set-up test-oldest-transformers benchmarks clean

demo: $(VENV)/.ready
	$(PY) demo.py

# The main suite, and the oldest-transformers run beside it (scripts/side_by_side.sh says why). The two installs
# before it run side by side too: pip installs on one core, and the oldest-transformers folder needs only the
# venv's pip, not its requirements (docs/development.md gives the times).
test:
	$(MAKE) --jobs=2 --no-print-directory set-up
	bash scripts/side_by_side.sh "$(PY) -m pytest -q -n $(TEST_WORKERS) tests" "$(TEST_OLDEST_TRANSFORMERS)"

# Model and remote-code tests against the oldest supported transformers (installed beside the venv), with the
# card's quick start and the processor-only AutoImageProcessor load (their checks run in the same interpreter as
# test_remote_code.py's), in one process (docs/development.md says why). PYTHONPATH is absolute: the remote-code
# checks run in an interpreter whose working folder is a temporary one, where a relative path finds nothing and
# the venv's transformers would be tested instead; the tests check the release named here is the one imported.
TEST_OLDEST_TRANSFORMERS = PYTHONPATH=$(abspath $(OLDEST_DIR)) NEARID_TRANSFORMERS_UNDER_TEST=$(OLDEST_TRANSFORMERS) \
	$(PY) -m pytest -q -p no:cacheprovider \
	tests/test_modeling.py tests/test_remote_code.py tests/test_hub.py::test_quick_start_of_the_card_scores_two_images \
	tests/test_image_processing.py::test_loads_through_auto_image_processor_as_remote_code
test-oldest-transformers: set-up
	$(TEST_OLDEST_TRANSFORMERS)

benchmarks: $(VENV)/.ready
	$(PY) benchmarks/bench_image_processor.py
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_train_compute.py
	$(PY) benchmarks/bench_token_loader.py
	$(PY) benchmarks/bench_embedding_pipeline.py
	$(PY) benchmarks/profile_input_path.py
	$(PY) benchmarks/bench_int8_cache.py
	$(PY) benchmarks/bench_fill_overlap.py
	$(PY) benchmarks/estimate_real_run.py
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_checksums.py
	$(PY) benchmarks/bench_plots.py
	$(PY) benchmarks/bench_cli_startup.py

# What `make test` needs installed. (The empty recipe keeps make from saying there is nothing to do.)
set-up: $(VENV)/.ready $(OLDEST_DIR)/.ready
	@:

# The venv with a current pip and nothing else yet.
$(PY):
	VENV=$(VENV) bash scripts/make_venv.sh

# The venv's python is order-only: it links to the base interpreter, whose time is not the venv's.
$(VENV)/.ready: pyproject.toml requirements.txt requirements-dev.txt scripts/setup_env.sh scripts/byte_compile.sh | $(PY)
	VENV=$(VENV) bash scripts/setup_env.sh requirements-dev.txt
	touch $@

# Byte-compiled as the venv is (scripts/byte_compile.sh says when and why). Its own packages, whatever the venv
# holds: pip's check of them against the venv's (which may be half installed, beside) is left out.
$(OLDEST_DIR)/.ready: | $(PY)
	# transformers is installed with the `kernels` release it supports: the venv's newer one breaks its import.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile --no-warn-conflicts --target $(OLDEST_DIR) \
		"transformers[kernels]==$(OLDEST_TRANSFORMERS)"
	bash scripts/byte_compile.sh $(PY) $(OLDEST_DIR)
	touch $@

clean:
	rm -rf $(VENV) .cache .pytest_cache
