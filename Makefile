# Thin wrappers around scripts/; each script also runs on its own.
#   make demo                 scikit-learn demo in its own venv (.venv-demo)
#   make test [ARGS=...]      ruff + pytest in the dev venv (.venv); ARGS go to pytest
#   make setup                create or refresh the dev venv only
#   make clean                delete both venvs (the next command rebuilds them)

ARGS ?=

.PHONY: demo test setup clean

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh $(ARGS)

setup:
	bash scripts/setup-env.sh .venv dev,sklearn,torch,tf,jax,ray

clean:
	rm -rf .venv .venv-demo
