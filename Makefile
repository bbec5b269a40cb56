# The two commands of the README. Both set everything up on a fresh machine.
.PHONY: demo test setup proto lock

VENV := .venv/bin

setup:
	@bash scripts/setup.sh

demo: setup
	@mkdir -p results
	$(VENV)/pdserve run-batch -i examples/sample_batch.jsonl -o results/sample_output.jsonl --no-resume
	@$(VENV)/python scripts/show_results.py results/sample_output.jsonl
	@$(VENV)/pdserve report results/sample_output.jsonl -o results/sample_report.html

test:
	@bash scripts/setup.sh --test
	$(VENV)/python -m pytest -q

# The gRPC stubs in proto/, made by the grpcio-tools pinned in requirements/constraints.txt.
proto: setup
	$(VENV)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. proto/kv_transfer.proto

# Re-resolve requirements/constraints.txt from pyproject.toml's ranges; then `make proto` and `make test`.
lock:
	@bash scripts/lock.sh
