# One command each: `make demo` (install if needed, then the main job on a built-in synthetic
# sample) and `make test` (install if needed, then the test suite). See README.md.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.faceage-installed
# pyspark's spark-defaults.conf + log4j2.properties, written again whenever the session settings change
SPARK_DEFAULTS := $(VENV)/.faceage-spark-defaults
# what `make install` adds to the pinned runtime: dev (tests: pytest, moto, mlflow) by default; the Docker image
# takes EXTRAS=mlflow. TORCH_INDEX: a wheel index for torch/torchvision first (e.g. PyTorch's CPU-only one).
EXTRAS ?= dev
TORCH_INDEX ?=
# spark-submit's launcher finds Spark through the first python3 on PATH: make it the venv's.
export PATH := $(abspath $(BIN)):$(PATH)
UTKFACE ?= ../shared/data/utkface
OUT ?= out

.PHONY: help install demo e2e test check-env bench-prepare prepare-utkface recipe recipe-report lock clean dist image
.DEFAULT_GOAL := help

help: ## list the targets (a bare `make` does this)
	@echo "faceage: make TARGET"
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z0-9-]+):.*## (.*)/  \1\t\2/' | expand -t 18

install: $(STAMP) $(SPARK_DEFAULTS) ## build .venv from the pins (once; again when setup.cfg or requirements.lock change)

# pip keeps its cache (~/.cache/pip), so a second venv reuses the torch wheel instead of downloading it.
$(STAMP): setup.cfg requirements.lock pyproject.toml
	@command -v java >/dev/null || { echo "install: Java 17 is required for Spark (apt-get install openjdk-17-jre-headless)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 'setuptools>=77' wheel
	$(if $(TORCH_INDEX),$(BIN)/pip install -q --index-url $(TORCH_INDEX) $$(grep -E '^torch(vision)?==' requirements.lock))
	$(BIN)/pip install -q -c requirements.lock -e '.[$(EXTRAS)]'
	# petastorm declares setuptools<70 (torch needs >=77): its runtime deps come from setup.cfg, it comes without.
	$(BIN)/pip install -q --no-deps -c requirements.lock petastorm==0.13.1
	touch $(STAMP)

# Delta's and hadoop-aws's jars fetched once (Ivy), then named on the class path in spark-defaults.conf
$(SPARK_DEFAULTS): $(STAMP) spark_jobs/session.py spark_jobs/log4j2.properties
	$(BIN)/python -m spark_jobs.session --write-defaults
	touch $(SPARK_DEFAULTS)

demo: install ## prepare the built-in synthetic sample (the main job on a built-in default)
	$(BIN)/spark-submit spark_jobs/prepare.py --demo

# prepare -> train -> score -> evaluate on a generated sample, ending in an HTML report (a few minutes on 2 cores)
E2E ?= demo_out/e2e
E2E_EPOCHS ?= 8
E2E_PHOTOS ?= 240
e2e: install ## generated photos -> prepare -> train -> score -> evaluate -> HTML report (a few minutes)
	@test ! -e $(E2E) || test -e $(E2E)/.faceage-e2e || { echo "e2e: $(E2E) exists and was not made by make e2e; refusing to delete it (set E2E=another/folder)"; exit 2; }
	rm -rf $(E2E)
	mkdir -p $(E2E) && touch $(E2E)/.faceage-e2e
	$(BIN)/spark-submit spark_jobs/prepare.py --demo --demo-count $(E2E_PHOTOS) --input $(E2E)/photos --output $(E2E)/prepared --size 64
	$(BIN)/python -m trainer.train --data $(E2E)/prepared --output $(E2E)/train --epochs $(E2E_EPOCHS) --batch-size 32 \
		--lr 1e-3
	$(BIN)/spark-submit spark_jobs/score.py --model $(E2E)/train/model.pt --input $(E2E)/photos --output $(E2E)/scored
	$(BIN)/spark-submit spark_jobs/evaluate.py --predictions $(E2E)/scored --labels $(E2E)/prepared --split test \
		--output $(E2E)/report
	@echo "e2e: open $(E2E)/report/report.html"

# what spark-submit needs on a cluster: dist/faceage_code.zip (--py-files), the job scripts, the pins, the EMR bootstrap
dist: install ## what spark-submit needs on a cluster, in dist/ (code zip, scripts, pins, EMR bootstrap, wheel)
	$(BIN)/python -m spark_jobs.emr build --dist dist
	$(BIN)/pip wheel -q --no-deps --no-build-isolation -w dist .

# The multi-worker tuning tests need PostgreSQL: .ci/postgres.sh starts a throwaway one on loopback
# (installing Debian's package when root); without it those tests skip, except under CI where they fail.
# The S3 tests need an S3-compatible server: .ci/s3.sh starts moto's on loopback and stops it afterwards.
test: install ## the test suite (starts a throwaway PostgreSQL and a local S3 server on loopback)
	@. .ci/postgres.sh || echo "test: no PostgreSQL server: the multi-worker tuning test will skip"; \
	. .ci/s3.sh || echo "test: no S3 server from .ci/s3.sh: the S3 tests start their own"; \
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; .ci/s3.sh stop; exit $$rc

check-env: install ## only the environment proofs (pins, Petastorm, torch, Optuna)
	$(BIN)/python -m pytest tests/test_environment.py -v

prepare-utkface: install ## prepare ../shared/data/utkface into out/utkface_parquet
	$(BIN)/spark-submit spark_jobs/prepare.py --input $(UTKFACE) --labels utkface --detector none \
		--output $(OUT)/utkface_parquet --format parquet

# The reference recipe for a 2-core CPU machine (issue 11): UTKFace prepared once, then one training within a
# 60-minute budget, the test split scored (with the training's TTA) and evaluated, and a model card beside the bundle.
RECIPE ?= runs/recipe
RECIPE_DATA ?= $(OUT)/utkface_parquet
AAF ?= ../shared/data/aaf
AAF_DATA ?= $(OUT)/aaf_parquet
RECIPE_TRAIN ?= --image-size 80 --augment 0.5 --epochs 80 --schedule onecycle --head distribution --cache \
	--tta flip --max-minutes 58 --age-calibration debias --no-progress
recipe: install ## UTKFace -> a 60-minute training on 2 CPU cores -> scored + evaluated test split -> MODEL_CARD.md
	test -f $(RECIPE_DATA)/manifest.json || $(BIN)/spark-submit spark_jobs/prepare.py --input $(UTKFACE) \
		--labels utkface --detector none --output $(RECIPE_DATA) --format parquet
	$(BIN)/python -m trainer.train --data $(RECIPE_DATA) --output $(RECIPE)/train $(RECIPE_TRAIN)
	$(MAKE) --no-print-directory recipe-report RECIPE=$(RECIPE) RECIPE_DATA=$(RECIPE_DATA) AAF=$(AAF) AAF_DATA=$(AAF_DATA) \
		RECIPE_TRAIN="$(RECIPE_TRAIN)"

# everything after the training, for a trained $(RECIPE)/train: the test split and All-Age-Faces scored and evaluated
# with the bundle as it ships and, when it has an age map, with a copy without it (the card's bias before/after);
# scored with score.py's default TTA: the one the bundle's calibration (and the training's final metrics) used
recipe-report: install ## the recipe's scoring, evaluation and model card for an already trained $(RECIPE)/train
	$(BIN)/python -m trainer.recalibrate --model $(RECIPE)/train/model.pt --drop age_map \
		--output $(RECIPE)/model_unmapped.pt
	for m in model unmapped; do \
	  bundle=$(RECIPE)/train/model.pt; test $$m = model || bundle=$(RECIPE)/model_unmapped.pt; \
	  sfx=; test $$m = model || sfx=_unmapped; \
	  $(BIN)/spark-submit spark_jobs/score.py --model $$bundle --input $(RECIPE_DATA) --split test \
	    --output $(RECIPE)/scored$$sfx && \
	  $(BIN)/spark-submit spark_jobs/evaluate.py --predictions $(RECIPE)/scored$$sfx --labels $(RECIPE_DATA) \
	    --split test --output $(RECIPE)/report$$sfx || exit 1; \
	done
	# faces unlike the training set: the test split's photos pasted into generated scenes, found by the detector
	$(BIN)/python -m bench.shift_data --data $(RECIPE_DATA) --work $(RECIPE)/shift --kinds pasted --photos-only
	$(BIN)/spark-submit spark_jobs/score.py --model $(RECIPE)/train/model.pt --input $(RECIPE)/shift/pasted \
		--output $(RECIPE)/shift/scored
	$(BIN)/spark-submit spark_jobs/evaluate.py --predictions $(RECIPE)/shift/scored \
		--labels $(RECIPE)/shift/pasted_labels.csv --output $(RECIPE)/shift/report
	# real photos it never saw: All-Age-Faces (another population, head-and-shoulders framing), labels from its
	# CSV through a table prepared with the detector on; the photos scored as photos (framed like the model's
	# training crops) and joined to those labels by face id, with and without the age map. Skipped when $(AAF)
	# is absent.
	if [ -d "$(AAF)/images" ]; then \
	  { test -f $(AAF_DATA)/manifest.json || $(BIN)/spark-submit spark_jobs/prepare.py --input $(AAF)/images \
	      --labels manifest:$(AAF)/labels.csv --dataset aaf --splits 0,0,1 --output $(AAF_DATA); } || exit 1; \
	  for m in model unmapped; do \
	    bundle=$(RECIPE)/train/model.pt; test $$m = model || bundle=$(RECIPE)/model_unmapped.pt; \
	    sfx=; test $$m = model || sfx=_unmapped; \
	    $(BIN)/spark-submit spark_jobs/score.py --model $$bundle --input $(AAF)/images \
	      --output $(RECIPE)/aaf/scored$$sfx && \
	    $(BIN)/spark-submit spark_jobs/evaluate.py --predictions $(RECIPE)/aaf/scored$$sfx --labels $(AAF_DATA) \
	      --split test --output $(RECIPE)/aaf/report$$sfx || exit 1; \
	  done; \
	fi
	aaf=(); name="All-Age-Faces photos, held out (detector on)"; test ! -f $(RECIPE)/aaf/report/metrics.json || \
	  aaf=(--cross "$$name=$(RECIPE)/aaf/report" --cross-unmapped "$$name=$(RECIPE)/aaf/report_unmapped"); \
	$(BIN)/python -m spark_jobs.model_card --run $(RECIPE)/train --report $(RECIPE)/report \
		--unmapped $(RECIPE)/report_unmapped \
		--cross "test photos pasted into generated scenes (detector on)=$(RECIPE)/shift/report" "$${aaf[@]}" \
		--command "make recipe RECIPE_TRAIN='$(strip $(RECIPE_TRAIN))'" --output $(RECIPE)/MODEL_CARD.md

bench-prepare: install ## the prepare benchmark (Spark vs a plain Pool, on UTKFace composites)
	$(BIN)/python -m bench.prepare_bench --utkface $(UTKFACE)

# the runtime image without a registry: Debian's packages (mmdebstrap) + the locked wheels, docker/image.txt's list
IMAGE ?= build/image
image: install ## the runtime image's root filesystem in build/image (root, mmdebstrap); run in it: docker/run-in-image.sh
	bash docker/rootfs.sh $(IMAGE)

lock: install ## rewrite requirements.lock from the installed environment
	$(BIN)/pip freeze --exclude-editable | grep -v '^faceage' | \
		(echo "# Exact versions of the whole environment (constraints for pip -c); regenerate with: make lock"; cat) > requirements.lock

clean: ## remove demo and scratch outputs
	rm -rf demo_out $(OUT) .pytest_cache spark-warehouse
