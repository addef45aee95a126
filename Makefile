# Two entry points; each creates .venv and installs what it needs on first use.
.PHONY: demo test
demo:
	bash scripts/demo.sh
test:
	bash scripts/test.sh
