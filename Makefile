# Copyright: virtfleet contributors
# SPDX-License-Identifier: GPL-3.0-or-later
# virtfleet.core — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# The venv's interpreter: Python 3.13 or 3.12 where the machine has one (tests/lab/python.sh says why), else python3.
PYTHON ?= $(shell bash tests/lab/python.sh)
VENV := .venv
BIN := $(VENV)/bin
LAB := $(BIN)/python tests/lab/lab.py
COLLECTION_ROOT := .build/ansible_collections/virtfleet/core
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/.build
export ANSIBLE_PYTHON_INTERPRETER := $(CURDIR)/$(BIN)/python
export ANSIBLE_NOCOLOR := 1

.PHONY: help deps demo test lint sanity unit oldest integration molecule lab-up lab-down lab-status collection build bench-discovery bench-converge bench-fleet

help:
	@echo "make demo   - install what is missing, bring the lab up, run the main job on it"
	@echo "make test   - install what is missing and run every check (lint, sanity, unit, integration)"
	@echo "make molecule | lab-up | lab-down | lab-status | bench-discovery | bench-converge | bench-fleet | build"

# ------------------------------------------------------------------------------------------- setup
.lab/.apt-done: bindep.txt tests/lab/install-deps.sh
	@bash tests/lab/install-deps.sh
	@mkdir -p .lab && touch $@

$(VENV)/.done: requirements.txt requirements-dev.txt tests/lab/python.sh .lab/.apt-done
	@# A venv made with another Python (an older checkout's) is made again.
	@want=$$($(PYTHON) -c 'import sys; print(sys.version_info[:2])'); \
	 have=$$($(BIN)/python -c 'import sys; print(sys.version_info[:2])' 2>/dev/null || true); \
	 if [ "$$want" != "$$have" ]; then rm -rf $(VENV) && echo "venv: $(PYTHON)" && $(PYTHON) -m venv $(VENV); fi
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q -r requirements-dev.txt
	@# Wheels of the collection's runtime requirements (and this ansible-core): the clean-install test
	@# (tests/integration/test_galaxy_build.py) installs from them alone, without a package index.
	@$(BIN)/pip wheel -q -w $(VENV)/wheels -r requirements.txt \
	  "ansible-core==$$($(BIN)/python -c 'import ansible; print(ansible.__version__)')"
	@touch $@

deps: .lab/.apt-done $(VENV)/.done

# The collection as Ansible expects to find it: .build/ansible_collections/virtfleet/core (a copy of
# the tracked and untracked-but-not-ignored files, so lab state and venvs never enter it).
collection: deps
	@rm -rf $(COLLECTION_ROOT) && mkdir -p $(COLLECTION_ROOT)
	@git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} $(COLLECTION_ROOT)/ 2>/dev/null || true
	@# ansible-test lists a collection's files with git: give the copy an index of its own.
	@cd $(COLLECTION_ROOT) && git init -q && git add -A

# ------------------------------------------------------------------------------------------- lab
lab-up: deps
	@$(LAB) up

lab-down:
	@if [ -x $(BIN)/python ]; then $(LAB) down; fi

lab-status: deps
	@$(LAB) status

# ------------------------------------------------------------------------------------------- checks
lint: collection
	$(BIN)/ruff check plugins tests
	$(BIN)/mypy
	$(BIN)/ansible-lint --offline --profile production
	$(BIN)/antsibull-changelog lint

sanity: collection
	bash tests/sanity/run.sh

unit: collection
	$(BIN)/pytest -q tests/unit

# The oldest ansible-core meta/runtime.yml claims (2.19), on Debian's python3 (3.11): the unit suite that needs
# no hypervisor library, the inventory's templating-safety tests among them. Supported means tested.
OLDEST := .venv-oldest
$(OLDEST)/.done: requirements-dev.txt .lab/.apt-done
	@rm -rf $(OLDEST) && python3 -m venv $(OLDEST)
	@$(OLDEST)/bin/pip install -q 'ansible-core>=2.19,<2.20' pytest hypothesis
	@touch $@

oldest: collection $(OLDEST)/.done
	$(OLDEST)/bin/python -c 'import ansible, sys; print("oldest: ansible-core", ansible.__version__, "on Python", sys.version.split()[0])'
	$(OLDEST)/bin/pytest -q -p no:cacheprovider tests/unit/plugins/inventory tests/unit/plugins/module_utils/test_safety.py \
	  tests/unit/plugins/module_utils/test_plan.py tests/unit/plugins/module_utils/test_model.py \
	  tests/unit/plugins/module_utils/test_endpoints.py tests/unit/plugins/module_utils/test_security_endpoints.py \
	  tests/unit/plugins/module_utils/test_fleet.py

integration: collection lab-up
	$(BIN)/pytest -q tests/integration

# Every Molecule scenario (extensions/molecule): the default scenario's create brings the lab up (and its destroy
# takes it down when create had to start anything); `molecule test -s NAME` runs one scenario, with the same create/destroy.
# A fresh ephemeral directory: what an interrupted run left there must not decide this one.
MOLECULE_DIR := $(CURDIR)/.build/molecule
molecule: collection
	@rm -rf $(MOLECULE_DIR)
	PATH=$(CURDIR)/$(BIN):$$PATH MOLECULE_EPHEMERAL_DIRECTORY=$(MOLECULE_DIR) $(BIN)/molecule test --all

test: lint sanity unit oldest integration molecule
	@echo "make test: all checks passed"

# ------------------------------------------------------------------------------------------- demo
demo: collection lab-up
	@export VMWARE_USER=$$($(BIN)/python -c 'import json; print(json.load(open(".lab/state.json"))["username"])'); \
	 export VMWARE_PASSWORD=$$($(BIN)/python -c 'import json; print(json.load(open(".lab/state.json"))["password"])'); \
	 $(BIN)/ansible-inventory -i playbooks/inventory/lab.hypervisors.yml --graph && \
	 $(BIN)/ansible-playbook -i playbooks/inventory/lab.hypervisors.yml -i localhost, playbooks/demo.yml \
	   -e demo_dir=$(CURDIR)/.build/demo

build: collection
	@mkdir -p .build/dist
	cd $(COLLECTION_ROOT) && $(CURDIR)/$(BIN)/ansible-galaxy collection build --force --output-path $(CURDIR)/.build/dist

bench-discovery: collection lab-up
	$(BIN)/python tests/bench/bench_discovery.py

bench-converge: collection lab-up
	$(BIN)/python tests/bench/bench_converge.py

bench-fleet: collection lab-up
	$(BIN)/python tests/bench/bench_fleet.py
